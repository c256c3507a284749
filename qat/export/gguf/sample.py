"""Sampled continuations of a prompt from a GGUF file, run by llama.cpp.

    .venv/bin/python -m qat.export.gguf.sample outputs/<run>/export/model.gguf "ROMEO:" -n 3
"""

from __future__ import annotations

import argparse
from pathlib import Path

from qat.export.gguf.parity import llama_model


def sample(path: str | Path, prompt: str, n: int = 3, max_tokens: int = 48,
           temperature: float = 0.8, seed: int = 0, threads: int | None = None) -> list[str]:
    """`n` continuations of `prompt` (top-p 0.95, seeds `seed`, `seed + 1`, ...)."""
    out = []
    with llama_model(path, 512, threads) as llm:
        for i in range(n):
            llm.set_seed(seed + i)
            res = llm(prompt, max_tokens=max_tokens, temperature=temperature, top_p=0.95)
            out.append(res["choices"][0]["text"])
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("gguf")
    ap.add_argument("prompt")
    ap.add_argument("-n", type=int, default=3, help="continuations (default 3)")
    ap.add_argument("--max-tokens", type=int, default=48)
    ap.add_argument("--temperature", type=float, default=0.8)
    args = ap.parse_args()
    if not Path(args.gguf).is_file():
        raise SystemExit(f"{args.gguf}: no such GGUF file")
    for i, text in enumerate(sample(args.gguf, args.prompt, args.n, args.max_tokens,
                                    args.temperature)):  # fmt: skip
        print(f"--- {i + 1}\n{args.prompt}{text}")


if __name__ == "__main__":
    main()
