"""Tiny seeded checkpoints for the tests: Llama, Qwen2 and Qwen3 with a tokenizer trained here.

Everything is built offline from a config: random weights from a fixed seed, and a
byte-level BPE tokenizer trained on a small corpus of Chinese product text, English and
emoji, so tokenizer parity is exercised on the scripts the app sees.
"""

from __future__ import annotations

from pathlib import Path

CORPUS = [
    "用户搜索 无线蓝牙耳机 降噪 运动",
    "点击 商品 华为 FreeBuds Pro 3 无线耳机 白色",
    "加入购物车 小米 充电宝 20000毫安 快充",
    "购买 蒙牛 纯牛奶 250ml*24盒 整箱",
    "搜索 连衣裙 夏季 新款 碎花 长裙 🌸",
    "点击 优衣库 男士 圆领T恤 纯棉 黑色 XL",
    "加购 三只松鼠 坚果大礼包 1.5kg 🎁",
    "search: running shoes men size 42 👟",
    "clicked: Apple iPhone 16 Pro Max case, clear",
    "purchased: organic green tea 100 bags 🍵",
    "下一个搜索：儿童 保温杯 316不锈钢 吸管",
    "浏览 美的 电饭煲 4L 智能 预约 家用",
    "The quick brown fox jumps over the lazy dog. 0123456789",
    "收藏 李宁 篮球鞋 韦德之道 ❤️ 限量",
]

ARCHITECTURES = ("llama", "qwen2", "qwen3")


def train_tokenizer(vocab_size: int = 384):
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=["<|endoftext|>", "<|im_start|>", "<|im_end|>"],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(CORPUS * 4, trainer=trainer)
    return PreTrainedTokenizerFast(
        tokenizer_object=tok, bos_token="<|im_start|>", eos_token="<|im_end|>", pad_token="<|endoftext|>"
    )


def tiny_config(arch: str, vocab_size: int, **overrides):
    from transformers import LlamaConfig, Qwen2Config, Qwen3Config

    common = dict(
        vocab_size=vocab_size, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256,
        rms_norm_eps=1e-6, bos_token_id=1, eos_token_id=2, pad_token_id=0,
    )
    head_dim = overrides.pop("head_dim", 32)
    common.update(overrides)
    if arch == "llama":
        return LlamaConfig(**common, tie_word_embeddings=False)
    if arch == "qwen2":
        return Qwen2Config(**common, tie_word_embeddings=True)
    if arch == "qwen3":
        return Qwen3Config(**common, head_dim=head_dim, tie_word_embeddings=True)
    raise ValueError(arch)


def make_tiny_checkpoint(arch: str, out: Path, seed: int = 0, **overrides) -> Path:
    """Write a tiny checkpoint folder (safetensors + tokenizer) and return it; ``overrides``
    change the config (odd shapes: head_dim, intermediate_size, ...)."""
    import torch
    from transformers import AutoModelForCausalLM

    tokenizer = train_tokenizer()
    config = tiny_config(arch, vocab_size=len(tokenizer), **overrides)
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    with torch.no_grad():
        for p in model.parameters():
            if p.dim() > 1:  # larger than the default init so logits are not all near zero
                p.normal_(0.0, 0.08)
            else:
                # Norm weights of 1.0 (the default) put int8-embedded activations on an exact
                # grid where dynamic activation quantization meets .5 ties everywhere; trained
                # models never look like that (see docs/parity.md, "dynamic activations").
                p.copy_(1.0 + 0.2 * torch.randn_like(p))
    out.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(out, safe_serialization=True)
    tokenizer.save_pretrained(out)
    return out
