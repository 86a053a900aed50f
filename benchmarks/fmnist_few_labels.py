"""SimMIM pre-training on Fashion-MNIST (no labels), then 600-label fine-tuning: pre-trained against
scratch with the same fine-tuning recipe and budget, over several seeds.

    .venv/bin/python benchmarks/fmnist_few_labels.py --minutes 30 --seeds 0 1 2

The seed picks both the labeled subset (60 per class) and the fine-tuning randomness; pre-trained and
scratch runs of one seed see the same labeled images. Results: OUT/results.json and a markdown table.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import time
from pathlib import Path

import torch

from selfsight.checkpoint import list_checkpoints
from selfsight.config import DEFAULT_DATA_DIR, build_config
from selfsight.engine import pretrain
from selfsight.eval.api import EvalConfig, evaluate

RAW_PIXEL_LOGREG_600 = 0.786  # logistic regression on raw pixels, same 600 labels, measured on this machine


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--minutes", type=float, default=30.0, help="pre-training budget")
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--labels-per-class", type=int, default=60)
    parser.add_argument("--finetune-epochs", type=int, default=None, help="default: the eval default")
    parser.add_argument("--data-dir", default=DEFAULT_DATA_DIR)
    parser.add_argument("--out", default="runs/bench_fmnist_few_labels")
    parser.add_argument("overrides", nargs="*", help="pre-training config overrides, key=value")
    args = parser.parse_args()

    out = Path(args.out)
    run = out / "pretrain"
    cfg = build_config(None, args.overrides, data=f"{args.data_dir}:train", out=str(run), minutes=args.minutes)
    started = time.time()
    if (run / "pretrain.json").is_file():
        pre = json.loads((run / "pretrain.json").read_text())
    else:
        pre = pretrain(cfg, resume=bool(list_checkpoints(run)))

    common = dict(train_data=f"{args.data_dir}:train", test_data=f"{args.data_dir}:test",
                  labels_per_class=args.labels_per_class, epochs=args.finetune_epochs)
    rows = []
    for seed in args.seeds:
        tuned = evaluate(EvalConfig(kind="finetune", run=str(run), seed=seed, out=str(out / f"seed{seed}"), **common))
        scratch = evaluate(EvalConfig(kind="finetune", init="scratch", backbone=cfg.backbone,
                                      backbone_opts=cfg.backbone_opts, seed=seed, out=str(out / f"seed{seed}"),
                                      **common))
        rows.append({"seed": seed, "pretrained": tuned["top1"], "scratch": scratch["top1"],
                     "finetune_minutes": tuned["minutes"], "scratch_minutes": scratch["minutes"]})
    probes = {kind: evaluate(EvalConfig(kind=kind, run=str(run), out=str(out), seed=0,
                                        **{k: v for k, v in common.items() if k != "epochs"}))["top1"]
              for kind in ("knn", "linear")}

    pre_acc = [r["pretrained"] for r in rows]
    scr_acc = [r["scratch"] for r in rows]
    spread = lambda xs: statistics.stdev(xs) if len(xs) > 1 else 0.0
    gain = statistics.mean(pre_acc) - statistics.mean(scr_acc)
    result = {
        "command": "python benchmarks/fmnist_few_labels.py " + " ".join(
            [f"--minutes {args.minutes:g}", "--seeds " + " ".join(map(str, args.seeds)), *args.overrides]),
        "machine": {"platform": platform.platform(), "cpus": os.cpu_count(), "torch": torch.__version__,
                    "threads": torch.get_num_threads()},
        "pretrain": pre,
        "config": {"backbone": cfg.backbone, "backbone_opts": {k: list(v) if isinstance(v, tuple) else v
                                                               for k, v in cfg.backbone_opts.items()},
                   "lr": cfg.optim.lr, "batch_size": cfg.batch_size, "method": cfg.method_config.__dict__},
        "seeds": rows,
        "pretrained_mean": statistics.mean(pre_acc), "pretrained_std": spread(pre_acc),
        "scratch_mean": statistics.mean(scr_acc), "scratch_std": spread(scr_acc),
        "gain_points": 100 * gain,
        "knn_top1_600": probes["knn"], "linear_top1_600": probes["linear"],
        "goal_gain_3_points": gain >= 0.03,
        "goal_above_raw_pixel_logreg": statistics.mean(pre_acc) > RAW_PIXEL_LOGREG_600,
        "wall_minutes": round((time.time() - started) / 60, 1),
    }
    out.mkdir(parents=True, exist_ok=True)
    (out / "results.json").write_text(json.dumps(result, indent=2))
    print("\n| seed | pre-trained | scratch |\n|---|---|---|")
    for r in rows:
        print(f"| {r['seed']} | {100 * r['pretrained']:.2f}% | {100 * r['scratch']:.2f}% |")
    print(f"| mean ± sd | {100 * result['pretrained_mean']:.2f} ± {100 * result['pretrained_std']:.2f}% | "
          f"{100 * result['scratch_mean']:.2f} ± {100 * result['scratch_std']:.2f}% |")
    print(f"gain {result['gain_points']:+.2f} points; k-NN {100 * probes['knn']:.2f}%, "
          f"linear {100 * probes['linear']:.2f}% (600 labels); pre-training {pre['minutes']:.1f} min, "
          f"{pre['steps']} steps, {pre['img_per_s']:.0f} img/s")


if __name__ == "__main__":
    main()
