"""Does serving from the cached prompt prefix change the artifact's next queries? The task
section's artifact side run twice on the same sessions: every prompt prefilled whole, and
every prompt fed from the prefix kept in the cache (as verify and the app run it).

    .venv/bin/python benchmarks/prefix_task.py out/intent-et-int8 --sessions 100 --out prefix-task.json

For each session both paths give the task's k candidates (exporter/intent/task.py's method);
reported: how often the two paths' top queries are equal (after the task's normalisation),
and each path's top-query agreement with the float model (its candidates from the task
reference cache when an earlier verify of the checkpoint put them there). Also the wall time
of each path's side. Writes JSON and prints a table; rates are counts with Wilson 95%
intervals.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("artifact", type=Path)
    parser.add_argument("--sessions", type=int, default=100)
    parser.add_argument("--out", type=Path, default=Path("prefix-task.json"))
    args = parser.parse_args()

    from exporter import artifact as art
    from exporter.backends import get_backend
    from exporter.intent.evalset import read_eval_set
    from exporter.intent.metrics import normalise
    from exporter.intent.prompt import behaviour_prompt_ids
    from exporter.intent.task import candidates, float_reference, task_stop_ids
    from exporter.load import load_model
    from exporter.recipe_io import recipe_from_dict
    from exporter.records import to_json
    from exporter.runners import PrefixCachedRunner
    from exporter.stats import wilson

    artifact = art.read_artifact(args.artifact)
    facts = artifact.manifest.model
    task = recipe_from_dict(artifact.manifest.recipe).task
    loaded = load_model(facts.source, adapter=facts.adapter or None)
    tokenizer = loaded.tokenizer
    stop_ids = task_stop_ids(tokenizer, facts)
    options = dict(k=task.candidates, max_new_tokens=task.max_new_tokens, stop_ids=stop_ids)
    prompts = behaviour_prompt_ids(read_eval_set(task.eval or "builtin")[:args.sessions], task, tokenizer)
    runner = get_backend(artifact.target).load_runner(artifact)
    cached = PrefixCachedRunner(runner, facts.prompt_prefix_ids)
    float_side = float_reference(loaded, facts, task, stop_ids)

    def top(ids: list[int]) -> str:
        return normalise(tokenizer.decode(ids, skip_special_tokens=True).strip())

    same = float_whole = float_cached = 0
    seconds = {"whole": 0.0, "cached": 0.0}
    try:
        for i, prompt in enumerate(prompts):
            reference = top(float_side(prompt, **options)[0])
            t0 = time.perf_counter()
            whole = top(candidates(runner, prompt, **options)[0])
            seconds["whole"] += time.perf_counter() - t0
            t0 = time.perf_counter()
            from_prefix = top(candidates(cached, prompt, **options)[0])
            seconds["cached"] += time.perf_counter() - t0
            same += whole == from_prefix
            float_whole += whole == reference
            float_cached += from_prefix == reference
            if (i + 1) % 10 == 0:
                print(f"{i + 1}/{len(prompts)}: paths equal {same}, float agreement whole {float_whole}, "
                      f"cached {float_cached}", flush=True)
    finally:
        float_side.save()
    n = len(prompts)
    result = {
        "artifact": str(args.artifact), "sessions": n, "prefix_tokens": len(facts.prompt_prefix_ids),
        "served_from_prefix": cached.served, "top_query_equal_between_paths": to_json(wilson(same, n)),
        "agreement_with_float_whole": to_json(wilson(float_whole, n)),
        "agreement_with_float_cached": to_json(wilson(float_cached, n)),
        "artifact_side_seconds": {k: round(v, 1) for k, v in seconds.items()},
    }
    args.out.write_text(json.dumps(result, indent=2) + "\n", encoding="utf-8")
    print(f"{'':40} {'rate':>34}")
    print(f"{'top query equal, whole vs cached prefix':40} {str(wilson(same, n)):>34}")
    print(f"{'= float model, prompts prefilled whole':40} {str(wilson(float_whole, n)):>34}")
    print(f"{'= float model, from the cached prefix':40} {str(wilson(float_cached, n)):>34}")
    print(f"artifact side: {seconds['whole']:.0f} s whole, {seconds['cached']:.0f} s from the prefix "
          f"({cached.served}/{n} served from it); wrote {args.out}")


if __name__ == "__main__":
    main()
