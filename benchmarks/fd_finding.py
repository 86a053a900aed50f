"""The Feature Distillation paper's finding, checked at the demo ViT's size (the issue "The rest of the seed
methods"): a contrastive ViT teacher (DINO) is pre-trained on Fashion-MNIST train (no labels), a fresh
student of the same size is distilled from it with FD for the same wall-clock budget, then both are
fine-tuned on 600 labels (the trusted protocol: several label draws, LP-FT, 50 epochs) and diagnosed side
by side: attention distance, attention entropy and head diversity per layer, and CKA between them.

    .venv/bin/python benchmarks/fd_finding.py --minutes 10 --out runs/fd_finding      # CPU
    python3 benchmarks/fd_finding.py --minutes 3 --device cuda --draws 5 --scratch   # a GPU: 8 minutes on an H200

Wei et al. 2022 report that the student fine-tunes better than its teacher, with more diverse heads and
more local attention (smaller attention distance) in its deeper layers. The teacher recipe is the DINO
recipe of benchmarks/fmnist_knn.py (crops 0.5-1, 4 local crops, 4,096 prototypes, a 1,024-wide head,
AdamW lr 5e-4, wd 0.04, momentum 0.99); the student takes FD's defaults. Each stage reuses what an
earlier invocation finished in OUT (a finished pre-training, an evaluation's json), so an interrupted
check resumes. Writes OUT/results.json, OUT/report.html (teacher and student side by side) and prints
markdown tables.
"""

from __future__ import annotations

import argparse
import json
import platform
import sys
import time
from pathlib import Path

import torch

from selfsight.checkpoint import list_checkpoints
from selfsight.config import DEFAULT_DATA_DIR, build_config
from selfsight.diagnostics import diagnose
from selfsight.engine import pretrain
from selfsight.eval.api import EvalConfig, evaluate
from selfsight.report import write_report

TEACHER_RECIPE = ["method.crop_scale=[0.5,1]", "lr=5e-4", "optim.weight_decay=0.04", "method.num_local_crops=4",
                  "method.hidden_dim=1024", "method.out_dim=4096", "method.base_momentum=0.99"]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--minutes", type=float, default=10.0, help="pre-training budget of each, teacher and student")
    parser.add_argument("--teacher-method", default="dino", choices=["dino", "mocov3"])
    parser.add_argument("--draws", type=int, default=5)
    parser.add_argument("--labels-per-class", type=int, default=60)
    parser.add_argument("--epochs", type=int, default=None, help="fine-tuning epochs (default: the recipe's, 50)")
    parser.add_argument("--scratch", action="store_true", help="also fine-tune the ViT from scratch")
    parser.add_argument("--tune", action="store_true", help="tune each fine-tune's lr on a validation split")
    parser.add_argument("--device", default="auto")
    parser.add_argument("--data-dir", default=DEFAULT_DATA_DIR)
    parser.add_argument("--out", default="runs/fd_finding")
    args = parser.parse_args()
    out = Path(args.out)
    data = args.data_dir
    started = time.time()
    teacher, student = out / "teacher", out / "student"
    recipe = TEACHER_RECIPE if args.teacher_method == "dino" else ["method.crop_scale=[0.5,1]"]
    runs = {"teacher": pretrain_once(teacher, args, recipe, method=args.teacher_method),
            "student": pretrain_once(student, args, [f"method.teacher={teacher.resolve()}"], method="fd")}

    protocol = dict(train_data=f"{data}:train", test_data=f"{data}:test", labels_per_class=args.labels_per_class,
                    draws=args.draws, epochs=args.epochs, device=args.device, tune=args.tune, progress=False)
    rows = {}
    for name, run in (("teacher", teacher), ("student", student)):
        rows[name] = evaluate_once(EvalConfig(kind="finetune", run=str(run), out=str(out / "eval" / name), **protocol))
    if args.scratch:
        rows["scratch"] = evaluate_once(EvalConfig(kind="finetune", run=str(teacher), init="scratch",
                                                   out=str(out / "eval" / "scratch"), **protocol))
    diagnostics = {
        "teacher": diagnose(teacher, data=f"{data}:test", compare=[student], device=args.device, progress=False),
        "student": diagnose(student, data=f"{data}:test", compare=[teacher], device=args.device, progress=False),
    }
    report = write_report([teacher, student], out / "report.html", title="FD: DINO teacher and its FD student")
    results = {
        "command": "python benchmarks/fd_finding.py " + " ".join(sys.argv[1:]),
        "machine": {"platform": platform.platform(), "cpu": platform.processor(), "torch": torch.__version__,
                    "threads": torch.get_num_threads(),
                    "cuda": torch.cuda.get_device_name(0) if torch.cuda.is_available() else None},
        "pretrain": runs,
        "finetune": {name: {k: rows[name][k] for k in ("top1", "top1_std", "top1_draws", "seeds", "hparams",
                                                        "minutes")} for name in rows},
        "attention": {name: layer_summary(diagnostics[name]) for name in diagnostics},
        "cka_teacher_vs_student": diagnostics["teacher"]["compare"][0]["cka"] if diagnostics["teacher"]["compare"]
        else None,
        "report": str(report),
        "wall_minutes": round((time.time() - started) / 60, 2),
    }
    out.mkdir(parents=True, exist_ok=True)
    (out / "results.json").write_text(json.dumps(results, indent=2, default=str))
    print(markdown(results))


def pretrain_once(run: Path, args: argparse.Namespace, overrides: list[str], method: str) -> dict:
    """``args.minutes`` of ``method`` on Fashion-MNIST train into ``run`` (the demo ViT), reused when finished."""
    done = run / "pretrain.json"
    if not done.is_file():
        cfg = build_config(None, overrides, method=method, data=f"{args.data_dir}:train", out=str(run),
                           minutes=args.minutes, device=args.device, monitor_data=f"{args.data_dir}:test")
        print(f"{method} on {cfg.backbone} for {args.minutes:g} min into {run}", flush=True)
        pretrain(cfg, resume=bool(list_checkpoints(run)), progress=False)
    record = json.loads(done.read_text())
    config = (run / "config.yaml").read_text()
    precision = next((line.split(":", 1)[1].strip() for line in config.splitlines() if line.startswith("precision:")),
                     None)
    return {**{k: record.get(k) for k in ("method", "steps", "minutes", "img_per_s", "final_loss")},
            "precision": precision}


def evaluate_once(cfg: EvalConfig) -> dict:
    """``evaluate(cfg)``, or the json an earlier invocation wrote for it."""
    earlier = sorted(Path(cfg.out).glob("eval_finetune*.json")) if Path(cfg.out).is_dir() else []
    if earlier:
        print(f"reusing {earlier[0]}")
        return json.loads(earlier[0].read_text())
    return evaluate(cfg)


def layer_summary(record: dict) -> list[dict]:
    """Per attention layer: mean attention distance (px) and entropy over heads, and head diversity."""
    rows = []
    for layer in record.get("attention") or []:
        rows.append({"layer": layer["name"], "distance_px": layer["mean_distance_px"], "entropy": layer["mean_entropy"],
                     "head_diversity": layer["head_diversity"], "distance_px_per_head": layer["distance_px"]})
    return rows


def markdown(results: dict) -> str:
    lines = ["| model | pre-training | fine-tune top-1, mean ± std | draws |", "|---|---|---|---|"]
    for name, row in results["finetune"].items():
        pre = results["pretrain"].get(name, {})
        budget = f"{pre.get('method')}, {pre.get('steps')} steps, {pre.get('minutes')} min" if pre else "none"
        draws = ", ".join(f"{100 * t:.2f}" for t in row["top1_draws"])
        lines.append(f"| {name} | {budget} | {100 * row['top1']:.2f} ± {100 * row['top1_std']:.2f} | {draws} |")
    lines += ["", "| layer | distance px (teacher / student) | entropy (teacher / student) | "
                  "head diversity (teacher / student) |", "|---|---|---|---|"]
    for t, s in zip(results["attention"]["teacher"], results["attention"]["student"]):
        lines.append(f"| {t['layer']} | {t['distance_px']:.2f} / {s['distance_px']:.2f} | {t['entropy']:.3f} / "
                     f"{s['entropy']:.3f} | {fmt(t['head_diversity'])} / {fmt(s['head_diversity'])} |")
    return "\n".join(lines)


def fmt(value) -> str:
    return "-" if value is None else f"{value:.3f}"


if __name__ == "__main__":
    main()
