"""The recipes of ``conf/experiment/`` at one or more training budgets, each against the dense model
fine-tuned on the same number of steps and tokens; writes docs/benchmarks.md "Recipes" and
docs/recipes.png (held-out ppl over training tokens, and over bytes).

Each recipe runs as a user runs it (``python run.py experiment=<name> trainer.max_steps=<S>``, a
KD recipe with ``compress.kd.teacher_steps=<S>``) in its own output folder; a KD recipe's student
saw the teacher stage's tokens too (``start_from_teacher``), so its dense baseline is fine-tuned for
``teacher_steps + max_steps`` steps (``run.py +recipe=budget trainer.max_steps=<that>``). Quality is
``val ppl after / dense baseline val ppl``, both over the same 8 held-out batches (4,064 tokens).

    .venv/bin/python experiments/bench/recipes.py sparse24_kd w8a8 --steps 40
    .venv/bin/python experiments/bench/recipes.py --steps 20 40 80      # every recipe, three budgets
    .venv/bin/python experiments/bench/recipes.py sparse24_kd --teachers  # which teacher helps

``--teachers`` adds, for each KD recipe, the same compression on the same total tokens without the
fine-tuned teacher: from the pretrained model with no KD, and with KD from the pretrained model
(``teacher=student``, the previous default).
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

from _common import BENCHMARKS_MD, header

from lightcook.app.config import CONFIG_DIR, compose_config
from lightcook.render import curves_figure, mb, num, save_figure, scatter_figure, table, write_section

ROOT = Path(__file__).resolve().parents[2]
#: The issue's targets, ratio to dense fine-tuned on the same tokens.
TARGETS = {
    "w4a8_kd": 1.10,
    "w2_kd": 1.6,
    "sparse24_kd": 1.20,
    "structured25_kd": 1.25,
    "structured50_kd": 2.0,
    "moe25": 1.20,
    "pdqm": 2.0,
    "sparse24_w8a8_kd": 1.30,
}
TOKENS_PER_STEP = 4 * 128


def recipes() -> list[str]:
    """Every recipe in ``conf/experiment/`` but the demo and the tiny smoke run."""
    return sorted(
        p.stem for p in (CONFIG_DIR / "experiment").glob("*.yaml") if p.stem not in {"demo", "smoke"}
    )


def load(summary_path: Path) -> dict:
    """A run's summary.json, with its report.json (``{}`` when the run wrote none) under ``report``."""
    summary = json.loads(summary_path.read_text())
    report = summary_path.parent / "report.json"
    summary["report"] = json.loads(report.read_text()) if report.exists() else {}
    return summary


def cached(overrides: list[str], out: Path) -> dict:
    """``run.py <overrides>`` with its outputs under ``out`` (:func:`load`), or what an earlier call with
    the same overrides left there."""
    done = sorted(out.glob("runs/*/summary.json"))
    if (
        done
        and (out / "overrides.json").exists()
        and json.loads((out / "overrides.json").read_text()) == overrides
    ):
        return load(done[0])
    shutil.rmtree(out, ignore_errors=True)
    out.mkdir(parents=True)
    env = {**os.environ, "LIGHTCOOK_OUTPUT_DIR": str(out)}
    with open(out / "run.log", "w") as log:
        subprocess.run(
            [sys.executable, "run.py", *overrides], cwd=ROOT, env=env, stdout=log, stderr=log, check=True
        )
    (summary_path,) = sorted(out.glob("runs/*/summary.json"))
    (out / "overrides.json").write_text(json.dumps(overrides))
    return load(summary_path)


STUDENT_TEACHER = [
    "compress.kd.teacher=student",
    "compress.kd.teacher_steps=0",
    "compress.kd.start_from_teacher=false",
]


def row(
    label: str, steps: str, total: int, overrides: list[str], dense: dict, out: Path, curves, points
) -> list:
    """Run (or reuse) one recipe variant; its table row, its point on the curves and the bytes plot."""
    slug = label.replace(", ", "-").replace(" ", "_")
    summary = cached(overrides, out / f"{slug}-{steps.replace(' + ', '+')}")
    report = summary["report"]
    ppl, base_ppl = summary["val_ppl_after"], dense["val_ppl_after"]
    ratio = ppl / base_ppl
    size = report.get("bytes", {})
    bytes_ratio = size["measured"] / size["dense_fp32"] if size.get("measured") else None
    decode = (report.get("speed") or {}).get("decode") or {}
    target = TARGETS.get(label)
    met = "—" if target is None else ("yes" if ratio <= target else f"no (+{ratio - target:.2f})")
    stage = summary.get("teacher_stage") or {}
    curves.setdefault(label, []).append((total * TOKENS_PER_STEP, ppl))
    if bytes_ratio is not None:
        points.append((size["measured"] / 1e6, ppl, f"{label} ({steps})"))
    return [
        label, steps if " + " in steps else f"0 + {steps}", num(summary["val_ppl_before"]),
        num(stage.get("val_ppl")) if stage else "—", num(ppl), num(base_ppl), f"**{ratio:.2f}x**",
        "—" if target is None else f"≤ {target:.2f}x", met, mb(size.get("measured")), num(bytes_ratio),
        num(decode.get("speedup_vs_bf16"), suffix="x"), f"{summary.get('wall_seconds', 0) / 60:.1f}",
    ]  # fmt: skip


def write_docs(rows: list, curves: dict, points: list, dense_curve: dict, started: float) -> None:
    """The "Recipes" section of docs/benchmarks.md and its two figures, from the rows so far."""
    heads = ["recipe", "steps (teacher + recovery)", "val ppl before training", "teacher ppl", "ppl", "dense FT, same steps",
             "ratio", "target", "met", "bytes", "x dense fp32", "decode vs bf16", "wall min"]  # fmt: skip
    curves = {**curves, "dense fine-tuned": sorted(dense_curve.items())}
    fig = curves_figure(curves, xlabel="training tokens (teacher stage included)", ylabel="held-out ppl",
                        title="recipes: ppl over training tokens", size=(7.0, 4.5))  # fmt: skip
    figures = [save_figure(fig, BENCHMARKS_MD.parent / "recipes.png")]
    fig = scatter_figure(
        points, xlabel="MB of the export", ylabel="held-out ppl", title="recipes: ppl over bytes"
    )
    figures.append(save_figure(fig, BENCHMARKS_MD.parent / "recipes_bytes.png"))
    lines = [
        *header("recipes.py", wall=time.time() - started),
        "",
        "Each row: `python run.py experiment=<recipe>` at that budget (the recipe's own command; KD recipes "
        "fine-tune the dense teacher for as many steps first and start the student from it). Dense FT: "
        "`run.py +recipe=budget` for the same total steps and tokens (4 x 128 per step). Held-out ppl "
        "over 8 validation batches (4,064 tokens); bytes and decode speed (batch 1, 16 new tokens, vs "
        "dense bf16, interleaved medians) from the run's report.json.",
        "",
        *table(heads, rows),
        "",
        *[f"![{p.stem}]({p.name})" for p in figures],
    ]
    write_section(BENCHMARKS_MD, "Recipes", "\n".join(lines))
    print("\n".join(lines))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("recipes", nargs="*", help=f"default: all of {recipes()}")
    parser.add_argument("--steps", type=int, nargs="+", default=[40], help="recovery steps (budgets)")
    parser.add_argument("--teachers", action="store_true", help="add the no-KD and teacher=student rows")
    parser.add_argument("--out", type=Path, default=Path("outputs/bench-recipes"))
    args = parser.parse_args()
    names = args.recipes or recipes()
    unknown = sorted(set(names) - set(recipes()))
    if unknown:
        parser.error(f"unknown recipe(s) {unknown}; available: {recipes()}")
    started = time.time()
    rows, curves, points, dense_curve = [], {}, [], {}
    dense: dict[int, dict] = {}
    for steps in args.steps:
        for name in names:
            cfg = compose_config([f"experiment={name}"])
            kd = cfg.compress.get("kd")
            teacher = steps if kd is not None and kd.teacher == "finetune" else 0
            overrides = [f"experiment={name}", f"trainer.max_steps={steps}"]
            if teacher:
                overrides.append(f"compress.kd.teacher_steps={teacher}")
            total = steps + (teacher if teacher and kd.start_from_teacher else 0)
            if total not in dense:
                base = ["+recipe=budget", f"trainer.max_steps={total}", "save_model=false"]
                dense[total] = cached(base, args.out / f"dense-{total}")
                dense_curve[total * TOKENS_PER_STEP] = dense[total]["val_ppl_after"]
            variants = [(name, overrides, f"{teacher} + {steps}" if teacher else str(steps))]
            if args.teachers and teacher:
                same = [f"experiment={name}", f"trainer.max_steps={total}"]
                variants += [
                    (f"{name}, no KD", [*same, "~compress.kd"], f"0 + {total}"),
                    (f"{name}, KD from the pretrained model", [*same, *STUDENT_TEACHER], f"0 + {total}"),
                ]
            for label, run_overrides, shown in variants:
                rows.append(row(label, shown, total, run_overrides, dense[total], args.out, curves, points))
                write_docs(
                    rows, curves, points, dense_curve, started
                )  # after every row: a stopped run keeps its rows


if __name__ == "__main__":
    main()
