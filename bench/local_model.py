"""Decoding speed of the local model: our logprob processor against llama-cpp's ``logits_all``.

    python bench/local_model.py [--model smollm2-135m] [--tokens 128] [--threads N]

Prints tokens/s for plain decoding, decoding with our log-probabilities (logits processor +
numpy log-softmax, top 5 alternatives), and llama-cpp-python's own log-probabilities, which need
``logits_all=True``; then checks that both give the same log-probability for every token.
Needs the ``[local]`` extra.
"""

from __future__ import annotations

import argparse
import time
from typing import Any

from cascade.providers.local import resolve_model
from cascade.providers.local_server import LocalModel, default_threads


def _rate(fn: Any, n: int = 2) -> tuple[float, Any]:
    best, out = 0.0, None
    for _ in range(n):
        t = time.perf_counter()
        out = fn()
        tokens = out["usage"]["completion_tokens"]
        best = max(best, tokens / (time.perf_counter() - t))
    return best, out


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default="smollm2-135m")
    p.add_argument("--tokens", type=int, default=128)
    p.add_argument("--threads", type=int, default=None)
    args = p.parse_args()
    path = resolve_model(args.model)
    threads = args.threads or default_threads()
    messages = [{"role": "user", "content": "Write a short story about a lighthouse keeper."}]
    body: dict[str, Any] = {"messages": messages, "temperature": 0, "max_tokens": args.tokens}

    model = LocalModel(path, n_threads=threads)
    plain, _ = _rate(lambda: model.chat(body))
    ours, mine = _rate(lambda: model.chat({**body, "logprobs": True, "top_logprobs": 5}))
    prompt = model.prompt_tokens(messages)
    model.llama.close()

    from llama_cpp import Llama

    full = Llama(model_path=str(path), n_ctx=2048, n_threads=threads, logits_all=True,
                 verbose=False)
    theirs, ref = _rate(lambda: full.create_completion(
        prompt, max_tokens=args.tokens, temperature=0, repeat_penalty=1.0, logprobs=5))

    ours_lp = [c["logprob"] for c in mine["choices"][0]["logprobs"]["content"]]
    ref_lp = ref["choices"][0]["logprobs"]["token_logprobs"]
    n = min(len(ours_lp), len(ref_lp))
    diff = max(abs(a - b) for a, b in zip(ours_lp[:n], ref_lp[:n], strict=True))
    print(f"model {path.name}, {args.tokens} tokens, {threads} thread(s)")
    print(f"  plain decoding             {plain:7.1f} tokens/s")
    print(f"  + our logprobs (top 5)     {ours:7.1f} tokens/s")
    print(f"  llama-cpp logits_all=True  {theirs:7.1f} tokens/s  (ours: {ours / theirs:.1f}x)")
    print(f"  max |logprob difference| over {n} tokens: {diff:.2e}")


if __name__ == "__main__":
    main()
