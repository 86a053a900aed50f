"""Data-parallel training under torchrun (gloo backend, 2 CPU processes) and fault-tolerant restarts.

One torchrun launch trains every method for a few steps in 2 processes (this file is its worker
script, see ``worker`` at the bottom); the tests compare those runs with 1-process runs of the same
global batch, check that only rank 0 wrote into the run directories and that the ranks ended with
identical weights, queues and centres. A second launch, through ``-m selfsight pretrain``, has a
worker SIGKILL itself mid-run under ``--max-restarts``; the job must resume by itself and end where
the uninterrupted run ends.

Tolerance of the 2-process vs 1-process comparison: rtol 1e-4 on every logged loss. Measured over 6
steps: 1e-7 (SimCLR, MoCo v2, SimMIM) to 1.1e-5 (MoCo v3) apart; batch statistics, gathered negatives
and averaged gradients are summed in another order, and AdamW's early steps amplify that a little.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from conftest import TINY_VIT
from test_data import in_memory_set, take
from test_fd import fd_teacher
from test_mae import run_config as mae_config
from test_methods import SMALL, TINY_CNN, cnn_config, gen, images, make
from test_spark import spark_config

from selfsight import distributed
from selfsight.checkpoint import REFUSED_MARKER, list_checkpoints, load_latest_checkpoint
from selfsight.config import build_config
from selfsight.data import BatchStream
from selfsight.engine import Trainer, pretrain
from selfsight.errors import ConfigError
from selfsight.losses import info_nce, nt_xent
from selfsight.masking import simmim_mask

METHODS = ["simclr", "mocov2", "simmim", "byol", "dino", "moby", "mocov3", "fd", "mae", "spark", "pic", "pixpro"]
STEPS = 6
RTOL = 1e-4
# SparK at lr 1e-4: at the default 1.5e-3 its 1-process and 2-process runs part by up to 6e-4 by step 5
# (measured), though their first-step gradients agree to 1.6e-5. Some of its gradients are exactly 0 in
# exact arithmetic (a block's zero-initialised BatchNorm makes layer 4 scale-free before SparK's densify
# BatchNorm), so summation noise decides the sign of AdamW's +-lr first step there; the tiny ResNet's max
# pooling then routes later gradients differently. At 1e-4 the runs stay within 4e-7, and a sparse BatchNorm
# that drops the other rank's share of the gradient still parts them by 2e-3.
SPARK_LR = 1e-4
# PixPro at lr 1e-4, likely for the reason SparK needs it (the same tiny ResNet at 64 px). Measured at the
# default lr: the 1-process and 2-process losses agree to 4e-7 at step 1 and 2e-6 at steps 2-3, then part by
# up to 3e-4 by step 6; at 1e-4 they stay within 4e-6 over the 6 steps.
PIXPRO_LR = 1e-4
ROOT = Path(__file__).resolve().parent.parent


def run_config(idx_dir: Path | str, out: Path | str, method: str, **changes):
    """The tiny configuration of ``method``: SimMIM and FD (its teacher: ``fd_teacher``) on the tiny ViT, the
    others on the tiny ResNet (with BatchNorm in backbone and heads). Global batch 32, ``STEPS`` steps,
    checkpoints every 2."""
    base = {"steps": STEPS, "ckpt_every": 2, "keep_checkpoints": 3, "precision": "fp32", **changes}
    if method == "mae":  # the tiny ViT with a one-block decoder
        return mae_config(idx_dir, out, **base)
    if method == "spark":  # the tiny ResNet at 64 px (a 2x2 mask grid at stride 32), sparse BatchNorm over ranks
        return spark_config(idx_dir, out, optim={"lr": SPARK_LR}, **base)
    if method == "pixpro":  # the tiny ResNet at 64 px: a 2x2 feature map, so pixels pair across views
        return cnn_config(idx_dir, out, method, backbone_opts={**TINY_CNN[1], "img_size": 64},
                          optim={"lr": PIXPRO_LR}, **base)
    if method not in ("simmim", "fd"):
        return cnn_config(idx_dir, out, method, **base)
    overrides = [f"method.teacher={fd_teacher(idx_dir)}"] if method == "fd" else None
    return build_config(
        None, overrides, method=method, backbone=TINY_VIT[0], backbone_opts=TINY_VIT[1], data=f"{idx_dir}:train",
        out=str(out), batch_size=32, log_every=1, device="cpu", num_workers=0, **base,
    )


def losses(run: Path) -> list[tuple[int, float]]:
    records = map(json.loads, (run / "metrics.jsonl").read_text().splitlines())
    return [(r["step"], r["loss"]) for r in records if "loss" in r]


def torchrun(*args: str, env: dict[str, str] | None = None, timeout: float = 300) -> subprocess.CompletedProcess:
    """``python -m torch.distributed.run --standalone --nproc-per-node 2 ARGS`` (a free port each time).

    On timeout torchrun gets SIGTERM, on which it stops its workers (they run in sessions of their own,
    out of reach of a kill of torchrun alone)."""
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2", *args]
    full_env = {**os.environ, "OMP_NUM_THREADS": "1", **(env or {})}
    full_env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(ROOT / "src"), full_env.get("PYTHONPATH")]))
    with subprocess.Popen(command, cwd=ROOT, env=full_env, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                          text=True) as process:
        try:
            stdout, stderr = process.communicate(timeout=timeout)
        except subprocess.TimeoutExpired:
            process.terminate()
            stdout, stderr = process.communicate(timeout=60)
            pytest.fail(f"torchrun {' '.join(args[:6])} ran past {timeout} s:\n{stderr[-6000:]}")
    return subprocess.CompletedProcess(command, process.returncode, stdout, stderr)


def state_digest(state: dict[str, torch.Tensor]) -> dict[str, list[float]]:
    """Two numbers per tensor (sum and a position-weighted sum): equal digests on two ranks mean equal tensors."""
    out = {}
    for name, tensor in state.items():
        flat = tensor.detach().double().flatten()
        out[name] = [float(flat.sum()), float((flat * torch.arange(1, flat.numel() + 1).double()).sum())]
    return out


@pytest.fixture(scope="module")
def two_process_runs(idx_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Every method trained for STEPS steps by one 2-process torchrun launch; returns the folder of the runs."""
    work = tmp_path_factory.mktemp("ddp")
    (work / "runs").mkdir()
    spec = {"idx_dir": str(idx_dir), "runs": str(work / "runs"), "reports": str(work), "methods": METHODS}
    fd_teacher(idx_dir)  # written here, before the workers read it
    (work / "spec.json").write_text(json.dumps(spec))
    done = torchrun(str(Path(__file__).resolve()), str(work / "spec.json"))
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-6000:]
    return work


# ---------------------------------------------------------------- data and draws: no processes needed


@pytest.mark.parametrize("world", [2, 3])
def test_each_sample_once_per_epoch_across_ranks(world):
    data = in_memory_set(23)
    single = BatchStream(data, batch_size=2 * world, seed=7)
    per_rank = [BatchStream(data, batch_size=2, seed=7, rank=r, world_size=world) for r in range(world)]
    assert all(s.batches_per_epoch == single.batches_per_epoch for s in per_rank)
    batches = [take(s, 2 * single.batches_per_epoch) for s in per_rank]
    for b, (one_process, _) in enumerate(take(single, 2 * single.batches_per_epoch)):
        # global batch b of the ranks = the 1-process batch b, rank r holding its r-th slice
        assert torch.equal(torch.cat([batches[r][b][0] for r in range(world)]), one_process)
    for epoch in range(2):
        seen = torch.cat([x[:, 0, 0, 0] for rank_batches in batches for x, _ in
                          rank_batches[epoch * single.batches_per_epoch:(epoch + 1) * single.batches_per_epoch]])
        assert seen.unique().numel() == seen.numel() == single.batches_per_epoch * 2 * world  # once each
    resumed = take(BatchStream(data, batch_size=2, seed=7, start_batch=3, rank=1, world_size=world), 2)
    assert all(torch.equal(a[0], b[0]) for a, b in zip(resumed, batches[1][3:5]))


def test_ranks_draw_their_slice_of_the_global_views_and_masks():
    simclr = make("simclr")
    whole = simclr.views(images(8), gen(3))
    halves = []
    for r in range(2):
        with distributed.rank_share_of_draws(r, 2):
            halves.append(simclr.views(images(8)[r * 4:(r + 1) * 4], gen(3)))
    for view, (first, second) in zip(whole, zip(*halves)):
        assert torch.equal(view, torch.cat([first, second]))
    mask = simmim_mask(8, 16, 4, 8, 0.6, gen(5))
    with distributed.rank_share_of_draws(1, 2):
        assert torch.equal(simmim_mask(4, 16, 4, 8, 0.6, gen(5)), mask[4:])
    # one process, no group: the collectives hand back their input
    x = torch.randn(3, 2)
    assert distributed.gather(x) is x and distributed.gather_with_grad(x) is x and distributed.world() == 1


def test_per_rank_losses_average_to_the_global_loss_and_gradient():
    """The maths behind gathered negatives: rank r's loss over its own anchors against every rank's
    embeddings, averaged over ranks, is the global loss, and so is its gradient (what DDP's mean of
    the gathered gradients computes)."""
    generator = torch.Generator().manual_seed(0)
    z1, z2 = torch.randn(8, 5, generator=generator), torch.randn(8, 5, generator=generator)
    q, k = torch.randn(8, 5, generator=generator), torch.randn(8, 5, generator=generator)
    # NT-Xent
    a, b = z1.clone().requires_grad_(), z2.clone().requires_grad_()
    global_loss = nt_xent(a, b, 0.2)
    global_loss.backward()
    c, d = z1.clone().requires_grad_(), z2.clone().requires_grad_()
    ranks = torch.stack([nt_xent(c[r * 4:(r + 1) * 4], d[r * 4:(r + 1) * 4], 0.2, c, d, offset=r * 4)
                         for r in range(2)])
    ranks.mean().backward()
    assert torch.allclose(ranks.mean(), global_loss)
    assert torch.allclose(c.grad, a.grad, atol=1e-6) and torch.allclose(d.grad, b.grad, atol=1e-6)
    # in-batch InfoNCE (MoCo v3) with gathered keys
    a = q.clone().requires_grad_()
    global_loss = info_nce(a, k, 0.2)
    global_loss.backward()
    c = q.clone().requires_grad_()
    ranks = torch.stack([info_nce(c[r * 4:(r + 1) * 4], k, 0.2, positive_offset=r * 4) for r in range(2)])
    ranks.mean().backward()
    assert torch.allclose(ranks.mean(), global_loss) and torch.allclose(c.grad, a.grad, atol=1e-6)


# ---------------------------------------------------------------- 2 processes against 1


@pytest.mark.parametrize("method", METHODS)
def test_two_processes_give_the_one_process_losses(two_process_runs, idx_dir, tmp_path, method):
    single = tmp_path / method
    pretrain(run_config(idx_dir, single, method), progress=False)
    two = two_process_runs / "runs" / method
    expected, got = losses(single), losses(two)
    assert [s for s, _ in got] == list(range(1, STEPS + 1)) == [s for s, _ in expected]
    assert [v for _, v in got] == pytest.approx([v for _, v in expected], rel=RTOL)
    assert json.loads((two / "run.json").read_text())["processes"] == 2


def test_ranks_agree_and_only_rank_0_writes(two_process_runs):
    reports = [json.loads((two_process_runs / f"rank{r}.json").read_text()) for r in range(2)]
    assert reports[1]["writes"] == []  # rank 1 opened nothing for writing under the run folders
    assert any("metrics.jsonl" in path for path in reports[0]["writes"])
    for method in METHODS:
        # weights, BatchNorm statistics, momentum copies, queues, DINO's centre: identical on both ranks
        assert reports[0]["digests"][method] == reports[1]["digests"][method], method
        run = two_process_runs / "runs" / method
        assert sorted(p.name for p in run.iterdir()) == [
            "checkpoints", "config.yaml", "metrics.jsonl", "pretrain.json", "run.json", "train.log"
        ]


# ---------------------------------------------------------------- fault tolerance


def test_killed_worker_restarts_and_resumes_from_last_checkpoint(two_process_runs, idx_dir, tmp_path):
    out = tmp_path / "killed"
    backbone_opts = [f"--backbone-opt={k}={','.join(map(str, v)) if isinstance(v, tuple) else v}"
                     for k, v in TINY_CNN[1].items()]
    overrides = [f"method.{k}={v}" for k, v in SMALL["simclr"].items()]
    done = torchrun(
        "--max-restarts", "2", "-m", "selfsight", "pretrain", "--method", "simclr", "--backbone", TINY_CNN[0],
        *backbone_opts, "--data", f"{idx_dir}:train", "--out", str(out), "--steps", str(STEPS),
        "--batch-size", "32", "--log-every", "1", "--ckpt-every", "2", "--device", "cpu", "--num-workers", "0",
        "--no-progress", "--precision", "fp32", "keep_checkpoints=3", *overrides,
        env={"SELFSIGHT_TEST_KILL_AT_STEP": "5", "SELFSIGHT_TEST_KILL_RANK": "1"},
    )
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-6000:]
    assert "exitcode: -9" in done.stderr  # torchrun saw the worker die of SIGKILL
    assert json.loads((out / "pretrain.json").read_text())["steps"] == STEPS
    log = (out / "train.log").read_text()
    assert "resuming" in log and "from step 4" in log  # the checkpoint before the kill after step 5
    reference = two_process_runs / "runs" / "simclr"
    # every step logged once (the lines of step 5 before the kill were dropped), with the uninterrupted values
    assert [s for s, _ in losses(out)] == list(range(1, STEPS + 1))
    assert losses(out) == losses(reference)  # bit for bit: resume is exact, gloo's sums deterministic
    final, path = load_latest_checkpoint(out)
    expected, _ = load_latest_checkpoint(reference)
    assert path.name == f"step-{STEPS:08d}.pt"
    assert all(torch.equal(final["model"][k], v) for k, v in expected["model"].items())


def test_ranks_skip_a_step_with_a_nonfinite_gradient_together(idx_dir, tmp_path, monkeypatch):
    """An inf in one rank's gradient after DDP's averaging (so only that rank sees it): both ranks skip the
    step, and the run goes on as a 1-process run that skips the same step."""
    out = tmp_path / "two"
    backbone_opts = [f"--backbone-opt={k}={','.join(map(str, v)) if isinstance(v, tuple) else v}"
                     for k, v in TINY_CNN[1].items()]
    overrides = [f"method.{k}={v}" for k, v in SMALL["simclr"].items()]
    done = torchrun(
        "-m", "selfsight", "pretrain", "--method", "simclr", "--backbone", TINY_CNN[0], *backbone_opts,
        "--data", f"{idx_dir}:train", "--out", str(out), "--steps", "4", "--batch-size", "32", "--log-every", "1",
        "--device", "cpu", "--num-workers", "0", "--no-progress", "--precision", "fp32", *overrides,
        env={"SELFSIGHT_TEST_INF_GRAD_AT_STEP": "1", "SELFSIGHT_TEST_INF_GRAD_RANK": "1"},
    )
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-6000:]
    monkeypatch.setenv("SELFSIGHT_TEST_INF_GRAD_AT_STEP", "1")
    monkeypatch.setenv("SELFSIGHT_TEST_INF_GRAD_RANK", "0")
    single = tmp_path / "one"
    pretrain(run_config(idx_dir, single, "simclr", steps=4), progress=False)
    for run in (out, single):
        assert json.loads((run / "pretrain.json").read_text())["skipped_steps"] == 1
    assert [v for _, v in losses(out)] == pytest.approx([v for _, v in losses(single)], rel=RTOL)


def test_restart_skips_damaged_newest_checkpoint_and_leftover_temp_file(idx_dir, tmp_path, monkeypatch):
    run = tmp_path / "run"
    pretrain(run_config(idx_dir, run, "simmim"), progress=False)
    uninterrupted = losses(run)
    newest, older = list_checkpoints(run)[:2]  # step 6 (the final one), step 4
    newest.write_bytes(newest.read_bytes()[:1000])  # truncated
    leftover = newest.with_name(f".{newest.name}.12345.tmp")
    leftover.write_bytes(b"half a checkpoint")  # the temporary file of a write killed half-way
    monkeypatch.setenv("TORCHELASTIC_RESTART_COUNT", "1")  # as torchrun sets it in a restarted attempt
    trainer = Trainer(run_config(idx_dir, run, "simmim"), progress=False)  # no resume=True: by itself
    assert trainer.step == 4 and trainer.resumed_from == older and not leftover.exists()
    trainer.fit()
    assert losses(run) == uninterrupted  # steps 5 and 6 again, bit for bit


def test_first_attempt_refuses_a_used_run_dir_and_so_do_its_restarts(idx_dir, tmp_path, monkeypatch):
    run = tmp_path / "run"
    pretrain(run_config(idx_dir, run, "simmim", steps=2), progress=False)
    monkeypatch.setenv("TORCHELASTIC_RESTART_COUNT", "0")
    with pytest.raises(ConfigError, match="--resume"):
        pretrain(run_config(idx_dir, run, "simmim", steps=2), progress=False)
    assert (run / REFUSED_MARKER).exists()
    monkeypatch.setenv("TORCHELASTIC_RESTART_COUNT", "1")  # torchrun restarts the refused job
    with pytest.raises(ConfigError, match="--resume"):
        pretrain(run_config(idx_dir, run, "simmim", steps=2), progress=False)
    monkeypatch.setenv("TORCHELASTIC_RESTART_COUNT", "0")  # a new job that asks to resume
    assert pretrain(run_config(idx_dir, run, "simmim", steps=2), resume=True, progress=False)["steps"] == 2
    assert not (run / REFUSED_MARKER).exists()


# ---------------------------------------------------------------- the torchrun worker


def worker(spec_path: str) -> None:
    """Runs in each torchrun process: trains every method of the spec in turn, then writes
    ``rank{r}.json`` (outside the run folders) with a digest of the final state of each run and, on
    every rank, the files it opened for writing under the run folders (recorded by an audit hook)."""
    spec = json.loads(Path(spec_path).read_text())
    runs = Path(spec["runs"])
    writes: list[str] = []

    def audit(event: str, args: tuple) -> None:
        if event == "open" and isinstance(args[0], str | bytes | os.PathLike):
            mode, flags = args[1], args[2]
            writing = any(c in mode for c in "wax+") if isinstance(mode, str) else bool(
                flags & (os.O_WRONLY | os.O_RDWR | os.O_CREAT))
        elif event in ("os.mkdir", "os.rename", "os.remove", "os.rmdir"):
            writing = True
        else:
            return
        path = os.path.abspath(os.fsdecode(args[0]))
        if writing and path.startswith(str(runs)):
            writes.append(path)

    sys.addaudithook(audit)
    distributed.init_from_env(torch.device("cpu"))
    digests = {}
    for method in spec["methods"]:
        trainer = Trainer(run_config(spec["idx_dir"], runs / method, method), progress=False)
        trainer.fit()
        digests[method] = state_digest(trainer.method.state_dict())
    report = {"writes": writes, "digests": digests}
    (Path(spec["reports"]) / f"rank{distributed.rank()}.json").write_text(json.dumps(report))
    distributed.cleanup()


if __name__ == "__main__":
    worker(sys.argv[1])


def test_nccl_gets_one_gpu_per_process(monkeypatch):
    """Under torchrun on CUDA each process takes cuda:LOCAL_RANK; one GPU named for every process of a machine,
    or more processes than GPUs, is refused before NCCL (which says only "Duplicate GPU detected", as seen on
    the H200 of docs/benchmarks.md) with what to do instead. CUDA is faked: only the device choice is checked."""
    from selfsight.engine import training_device
    from selfsight.errors import ConfigError

    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 2)
    for key, value in (("WORLD_SIZE", "2"), ("LOCAL_WORLD_SIZE", "2"), ("LOCAL_RANK", "1")):
        monkeypatch.setenv(key, value)
    assert training_device("cuda") == torch.device("cuda", 1)
    with pytest.raises(ConfigError, match="one GPU per process: give --device cuda "):
        training_device("cuda:0")
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 1)
    with pytest.raises(ConfigError, match=r"1 found, 2 processes started.*--nproc_per_node=1"):
        training_device("cuda")
    monkeypatch.setenv("LOCAL_WORLD_SIZE", "1")  # one process per machine (several machines): its choice stands
    assert training_device("cuda:0") == torch.device("cuda", 0)
    monkeypatch.setenv("WORLD_SIZE", "1")  # not distributed: untouched
    assert training_device("cuda") == torch.device("cuda")
