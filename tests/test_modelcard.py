"""`selfsight export` writes a model card (README.md) whose loading snippet runs as written."""

import json

import torch
from conftest import TINY_VIT, TINY_VIT_OPTS

import selfsight
from selfsight.cli import main


def test_export_writes_a_model_card_whose_snippet_runs(idx_dir, tmp_path, capsys):
    run, out = tmp_path / "run", tmp_path / "exported"
    selfsight.pretrain(f"{idx_dir}:train", run, method="simmim", backbone=TINY_VIT[0], backbone_opts=TINY_VIT_OPTS,
                       steps=2, batch_size=32, device="cpu", precision="fp32", progress=False)
    assert main(["export", str(run), "--out", str(tmp_path / "before")]) == 0
    assert "model card" in capsys.readouterr().out
    before = (tmp_path / "before" / "README.md").read_text()
    assert "No evaluation in the run directory" in before

    record = selfsight.evaluate("knn", run, train_data=f"{idx_dir}:train", test_data=f"{idx_dir}:test",
                                labels_per_class=8, draws=2, tune=False, device="cpu", progress=False)
    info = selfsight.export(run, out)
    card = (out / "README.md").read_text()
    assert info["card"] == str(out / "README.md")
    assert card.startswith(f"# {TINY_VIT[0]} pre-trained with simmim")
    assert "SimMIM (Xie et al. 2021" in card and "mask_ratio=0.6" in card and "`embed_dim=32`" in card
    assert "(IDX, 256 images), read at 16 px with 1 channel(s)" in card  # the data summary
    assert "2 steps (64 images, 0.2 epochs)" in card  # the budget
    row = next(line for line in card.splitlines() if line.startswith("| eval_knn_32.json"))
    assert f"{100 * record['top1']:.2f} ± {100 * record['top1_std']:.2f}% (2 draws)" in row and "| 32 |" in row
    mean = json.loads((out / "config.json").read_text())["pretrained_cfg"]["mean"][0]
    assert f"{mean:.4f}" in card

    snippet = card.split("```python\n")[1].split("```")[0]
    moved = tmp_path / "moved"
    out.rename(moved)  # the card's path is the one to replace when the folder moves
    namespace: dict = {}
    exec(snippet.replace(str(out / "model.safetensors"), str(moved / "model.safetensors")), namespace)
    model, config = namespace["model"], namespace["data_config"]
    assert config["input_size"] == (1, 16, 16) and config["mean"][0] == round(mean, 6)
    x = torch.randn(2, 1, 16, 16)
    reference = selfsight.load_backbone(moved)
    with torch.no_grad():
        assert torch.equal(model(x), reference(x))
    assert f"selfsight.load_backbone({str(out)!r})" in card

    # an interrupted run (no pretrain.json) still gets a card, which says so
    (run / "pretrain.json").unlink()
    selfsight.export(run, tmp_path / "again")
    assert "no complete summary (pretrain.json)" in (tmp_path / "again" / "README.md").read_text()
