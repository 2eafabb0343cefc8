// recgpt-et-runner: runs a recgpt-export .pte on the device, one request per line on stdin.
//
// The same binary runs on the host, under qemu-aarch64, over ssh and through adb: the
// protocol is plain lines in, one header line (+ raw little-endian float32 logits) out.
//
//   argv: recgpt-et-runner PROGRAM.pte [THREADS]
//   out:  READY <vocab> <threads> <hwcap> <hwcap2>    (the CPU features the kernels see, getauxval)
//   in:   STEP <start_pos> <n> <t1> ... <tn>    forward(tokens, input_pos): the last token's logits
//   out:  LOGITS <vocab>\n<vocab x float32>
//   in:   GREEDY <max_new> <n> <t1> ... <tn>    prefill + greedy decode, timed here (no IPC inside)
//   out:  GREEDY <first_token_us> <decode_us> <generated> <t1> ... <tk>
//   in:   QUIT
//   any error: ERROR <one line>, exit 1.
//
// The program's llama::update_cache and llama::custom_sdpa run on kernels of this file:
// ExecuTorch ships its own only inside a library that needs libtorch, which no phone has.
// Everything else (XNNPACK, quantized and optimized kernels) is the ExecuTorch wheel's.

#include <executorch/extension/kernel_util/make_boxed_from_unboxed_functor.h>
#include <executorch/extension/module/module.h>
#include <executorch/extension/tensor/tensor.h>
#include <executorch/runtime/kernel/kernel_includes.h>
#include <executorch/runtime/platform/runtime.h>

#include <chrono>
#include <cmath>
#include <cstdint>
#include <cstdio>
#include <cstring>
#include <iostream>
#include <optional>
#include <sstream>
#include <sys/auxv.h>
#include <string>
#include <vector>

namespace executorch::extension::threadpool {
// Declared here: the wheel ships the library but not this header.
class ThreadPool {
 public:
  bool _unsafe_reset_threadpool(uint32_t num_threads);
  size_t get_thread_count() const;
};
ThreadPool* get_threadpool();
}  // namespace executorch::extension::threadpool

using executorch::aten::ScalarType;
using executorch::aten::Tensor;
using executorch::runtime::KernelRuntimeContext;

namespace {

// update_cache.out(Tensor value, Tensor(a!) cache, SymInt start_pos, *, Tensor(b!) out):
// rows start_pos.. of cache [1, max_seq, kv_heads, head_dim] become value [1, seq, kv_heads, head_dim].
Tensor& update_cache_out(KernelRuntimeContext& ctx, const Tensor& value, Tensor& cache, int64_t start_pos,
                         Tensor& out) {
  ET_KERNEL_CHECK(ctx, value.scalar_type() == ScalarType::Float && cache.scalar_type() == ScalarType::Float,
                  InvalidArgument, out);
  const int64_t seq = value.size(1), row = value.size(2) * value.size(3);
  ET_KERNEL_CHECK(ctx, start_pos >= 0 && start_pos + seq <= cache.size(1), InvalidArgument, out);
  std::memcpy(cache.mutable_data_ptr<float>() + start_pos * row, value.const_data_ptr<float>(),
              sizeof(float) * seq * row);
  return out;
}

// custom_sdpa.out(query [1, seq, heads, d], key/value cache [1, S, kv_heads, d], start_pos, mask, dropout,
// is_causal, scale, *, out [1, seq, heads, d]): causal grouped-query attention over cache rows
// 0..start_pos+i for query row i, without repeating K/V.
Tensor& custom_sdpa_out(KernelRuntimeContext& ctx, const Tensor& q, const Tensor& k, const Tensor& v,
                        int64_t start_pos, const std::optional<Tensor>& mask, double dropout, bool is_causal,
                        std::optional<double> scale, Tensor& out) {
  ET_KERNEL_CHECK(ctx, !mask.has_value() && dropout == 0.0 && is_causal, InvalidArgument, out);
  // out is planned at the longest prefill: this call's length is the query's.
  ET_KERNEL_CHECK(ctx, executorch::runtime::resize_tensor(out, q.sizes()) == executorch::runtime::Error::Ok,
                  InvalidArgument, out);
  const int64_t seq = q.size(1), heads = q.size(2), d = q.size(3), kv_heads = k.size(2);
  const int64_t group = heads / kv_heads;
  const float factor = scale.has_value() ? static_cast<float>(*scale) : 1.0f / std::sqrt(static_cast<float>(d));
  const float* qd = q.const_data_ptr<float>();
  const float* kd = k.const_data_ptr<float>();
  const float* vd = v.const_data_ptr<float>();
  float* od = out.mutable_data_ptr<float>();
  std::vector<float> weights(start_pos + seq);
  for (int64_t i = 0; i < seq; ++i) {
    const int64_t keys = start_pos + i + 1;
    for (int64_t h = 0; h < heads; ++h) {
      const float* query = qd + (i * heads + h) * d;
      const int64_t kh = h / group;
      float top = -INFINITY;
      for (int64_t j = 0; j < keys; ++j) {
        const float* key = kd + (j * kv_heads + kh) * d;
        float dot = 0.0f;
        for (int64_t c = 0; c < d; ++c) dot += query[c] * key[c];
        weights[j] = dot * factor;
        top = weights[j] > top ? weights[j] : top;
      }
      float total = 0.0f;
      for (int64_t j = 0; j < keys; ++j) total += (weights[j] = std::exp(weights[j] - top));
      float* o = od + (i * heads + h) * d;
      for (int64_t c = 0; c < d; ++c) o[c] = 0.0f;
      for (int64_t j = 0; j < keys; ++j) {
        const float* value = vd + (j * kv_heads + kh) * d;
        const float w = weights[j] / total;
        for (int64_t c = 0; c < d; ++c) o[c] += w * value[c];
      }
    }
  }
  return out;
}

}  // namespace

EXECUTORCH_LIBRARY(llama, "update_cache.out", update_cache_out);
EXECUTORCH_LIBRARY(llama, "custom_sdpa.out", custom_sdpa_out);

namespace {

[[noreturn]] void fail(const std::string& message) {
  std::cout << "ERROR " << message << std::endl;
  std::exit(1);
}

struct Runner {
  executorch::extension::Module module;
  int64_t vocab = 0;

  explicit Runner(const char* path) : module(path, executorch::extension::Module::LoadMode::Mmap) {
    if (module.load_method("forward") != executorch::runtime::Error::Ok) fail("cannot load method forward");
    auto meta = module.method_meta("forward");
    if (!meta.ok()) fail("no method meta for forward");
    auto logits = meta->output_tensor_meta(0);
    if (!logits.ok()) fail("forward has no tensor output");
    auto sizes = logits->sizes();
    vocab = sizes[sizes.size() - 1];
  }

  // One forward call; the logits of its last token.
  const float* step(std::vector<int64_t>& tokens, int64_t start_pos) {
    auto ids = executorch::extension::from_blob(tokens.data(), {1, static_cast<int>(tokens.size())},
                                                ScalarType::Long);
    int64_t pos_value = start_pos;
    auto pos = executorch::extension::from_blob(&pos_value, {1}, ScalarType::Long);
    auto result = module.execute("forward", {ids, pos});
    if (!result.ok()) fail("forward failed with error " + std::to_string(static_cast<int>(result.error())));
    return result->at(0).toTensor().const_data_ptr<float>();
  }

  int64_t argmax(const float* logits) const {
    int64_t best = 0;
    for (int64_t i = 1; i < vocab; ++i) best = logits[i] > logits[best] ? i : best;
    return best;
  }
};

std::vector<int64_t> read_tokens(std::istringstream& in, int64_t count) {
  std::vector<int64_t> tokens(count);
  for (auto& token : tokens)
    if (!(in >> token)) fail("request is missing tokens");
  return tokens;
}

}  // namespace

int main(int argc, char** argv) {
  if (argc < 2) fail("usage: recgpt-et-runner PROGRAM.pte [THREADS]");
  executorch::runtime::runtime_init();
  if (argc > 2) executorch::extension::threadpool::get_threadpool()->_unsafe_reset_threadpool(std::atoi(argv[2]));
  Runner runner(argv[1]);
  const size_t threads = executorch::extension::threadpool::get_threadpool()->get_thread_count();
  std::cout << "READY " << runner.vocab << " " << threads << " " << getauxval(AT_HWCAP) << " " << getauxval(AT_HWCAP2)
            << std::endl;
  std::string line;
  while (std::getline(std::cin, line)) {
    std::istringstream in(line);
    std::string verb;
    in >> verb;
    if (verb == "QUIT") return 0;
    if (verb == "STEP") {
      int64_t start_pos = 0, count = 0;
      if (!(in >> start_pos >> count) || count < 1) fail("STEP needs a start position and a token count");
      auto tokens = read_tokens(in, count);
      const float* logits = runner.step(tokens, start_pos);
      std::cout << "LOGITS " << runner.vocab << "\n";
      std::cout.write(reinterpret_cast<const char*>(logits), sizeof(float) * runner.vocab);
      std::cout.flush();
    } else if (verb == "GREEDY") {
      int64_t max_new = 0, count = 0;
      if (!(in >> max_new >> count) || count < 1 || max_new < 1) fail("GREEDY needs a budget and a token count");
      auto tokens = read_tokens(in, count);
      using clock = std::chrono::steady_clock;
      const auto t0 = clock::now();
      int64_t next = runner.argmax(runner.step(tokens, 0));
      const auto first = clock::now();
      std::vector<int64_t> generated{next};
      for (int64_t pos = count; static_cast<int64_t>(generated.size()) < max_new; ++pos) {
        std::vector<int64_t> one{next};
        next = runner.argmax(runner.step(one, pos));
        generated.push_back(next);
      }
      const auto end = clock::now();
      auto us = [](auto a, auto b) { return std::chrono::duration_cast<std::chrono::microseconds>(b - a).count(); };
      std::cout << "GREEDY " << us(t0, first) << " " << us(first, end) << " " << generated.size() - 1;
      for (auto token : generated) std::cout << " " << token;
      std::cout << std::endl;
    } else {
      fail("unknown request " + verb);
    }
  }
  return 0;
}
