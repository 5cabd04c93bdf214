"""Run a GGUF file in llama.cpp (llama-cpp-python), for bench/convert.py, in the benchmark's own
environment (which has llama-cpp-python and nothing of the pipeline).

    .venv-bench/bin/python bench/llamacpp_run.py < request.json > answer.json

Request: {"model": PATH, "prompts": [[ids]...], "max_new_tokens": N, "stop": [ids], "logits_prompt": [ids],
"threads": N}. Answer: the greedy continuation of each prompt (token ids, stopping after a stop id),
the fp32 logits of every position of `logits_prompt`, and the decoding speed (generated tokens per
second of decoding, prompt evaluation excluded).
"""

from __future__ import annotations

import json
import sys
import time

import numpy as np
from llama_cpp import Llama


def main() -> int:
    req = json.load(sys.stdin)
    n_ctx = max(len(p) for p in [*req["prompts"], req["logits_prompt"]]) + req["max_new_tokens"] + 8
    llm = Llama(model_path=req["model"], n_ctx=n_ctx, logits_all=True, verbose=False, n_threads=req.get("threads"),
                n_batch=n_ctx)
    llm.reset()
    llm.eval(req["logits_prompt"])
    logits = np.array(llm.scores[: len(req["logits_prompt"])], dtype=np.float32)  # a copy: the buffer is reused
    generations, decoded, decode_s = [], 0, 0.0
    stop = set(req["stop"])
    for prompt in req["prompts"]:
        llm.reset()
        llm.eval(prompt)
        out = []
        t = time.perf_counter()
        for _ in range(req["max_new_tokens"]):
            nxt = int(np.argmax(llm.scores[llm.n_tokens - 1]))
            out.append(nxt)
            if nxt in stop:
                break
            llm.eval([nxt])
        decode_s += time.perf_counter() - t
        decoded += len(out)
        generations.append(out)
    json.dump({"generations": generations, "logits": logits.tolist(), "tokens_per_s": decoded / decode_s if decode_s else 0.0,
               "llama_cpp": __import__("llama_cpp").__version__}, sys.stdout)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
