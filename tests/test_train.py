"""train.py on a tiny config: both stages run, a killed run resumes to the same weights as an
uninterrupted one, and a kill never touches the shipped model folders; and the default config is
the recipe recorded with the shipped weights."""

import json
import shutil
from dataclasses import asdict, replace

import pytest
import torch

import flowscale
import checkpoints
import experiments
import toyworld
import train

TINY = train.TrainConfig(teacher_steps=12, student_steps=6, pairs=32, pair_steps=2, batch_size=8,
                         checkpoint_every=4, warmup=2, tiny=True, threads=1)


def configured(tmp, name):
    return replace(TINY, work=str(tmp / name / "work"), out_dev=str(tmp / name / "dev"),
                   out_schnell=str(tmp / name / "schnell"))


@pytest.fixture(scope="module")
def clean_run(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("train")
    cfg = configured(tmp, "clean")
    train.train(cfg)
    return tmp, cfg


def weights(folder):
    return checkpoints.read_safetensors(next((folder / "transformer").glob("*.safetensors")))


def test_both_stages_write_loadable_models(clean_run):
    _, cfg = clean_run
    for folder, variant in ((cfg.out_dev, "dev"), (cfg.out_schnell, "schnell")):
        pipe = flowscale.load_pipeline(folder)
        assert pipe.latent_shape == (27, 16, 16)
        gen = flowscale.generate(pipe, ["two red circles"], method="none", dynamics="linear-ode", nfe=2, num_steps=2)
        assert gen.images.shape == (1, 3, toyworld.IMAGE_SIZE, toyworld.IMAGE_SIZE)
        assert flowscale.json.loads((flowscale.Path(folder) / "flowscale.json").read_text())["variant"] == variant
    # the student starts from the teacher and moves away from it
    dev, schnell = weights(flowscale.Path(cfg.out_dev)), weights(flowscale.Path(cfg.out_schnell))
    assert dev.keys() == schnell.keys() and any(not torch.equal(dev[k], schnell[k]) for k in dev)


@pytest.mark.parametrize("stage, calls", [("teacher", 6), ("student", 3)])
def test_killed_run_resumes_to_the_same_weights(clean_run, monkeypatch, stage, calls):
    tmp, clean = clean_run
    cfg = configured(tmp, f"killed-{stage}")
    # A model shipped by an earlier run: a kill must leave it as it was, loadable.
    for folder in (cfg.out_dev, cfg.out_schnell):
        shutil.copytree(clean.out_dev, folder)
    before = weights(flowscale.Path(cfg.out_schnell))

    real_loss, seen = train.F.mse_loss, {"n": 0}

    def dying_loss(*args, **kwargs):   # the kill: an interrupt inside the chosen stage's step `calls`
        seen["n"] += 1
        if seen["n"] == (calls if stage == "teacher" else TINY.teacher_steps + calls):
            raise KeyboardInterrupt
        return real_loss(*args, **kwargs)

    monkeypatch.setattr(train.F, "mse_loss", dying_loss)
    with pytest.raises(KeyboardInterrupt):
        train.train(cfg)
    monkeypatch.setattr(train.F, "mse_loss", real_loss)
    shipped = weights(flowscale.Path(cfg.out_schnell))
    assert all(torch.equal(before[k], shipped[k]) for k in before)        # untouched by the kill
    flowscale.load_pipeline(cfg.out_schnell)                                # and still loads
    assert not list(flowscale.Path(cfg.out_schnell).parent.glob("*.partial"))

    train.train(cfg)                                                        # the resumed run
    for a, b in ((clean.out_dev, cfg.out_dev), (clean.out_schnell, cfg.out_schnell)):
        wa, wb = weights(flowscale.Path(a)), weights(flowscale.Path(b))
        assert all(torch.equal(wa[k], wb[k]) for k in wa), f"{b} differs from the uninterrupted run"


def test_a_work_folder_of_another_configuration_is_refused(clean_run):
    _, cfg = clean_run
    with pytest.raises(ValueError, match="another configuration"):
        train.train(replace(cfg, teacher_steps=13))


STAGE_2_FIELDS = {"pairs", "pair_steps", "student_steps", "student_lr", "student_t1"}


@pytest.mark.parametrize("variant", ["dev", "schnell"])
def test_the_default_config_is_the_recipe_of_the_shipped_weights(variant):
    """A fresh `python train.py` trains what weights/ ships: TrainConfig's defaults equal the run
    recorded in each folder's flowscale.json (dev: the fields of stage 1, which alone make the teacher)."""
    recorded = json.loads((flowscale.DEFAULT_MODEL.parent / f"mini-flux-{variant}" / "flowscale.json").read_text())["train"]
    defaults = asdict(train.TrainConfig())
    keys = [k for k in defaults if variant == "schnell" or k not in STAGE_2_FIELDS]
    assert {k: recorded[k] for k in keys} == {k: defaults[k] for k in keys}


def test_compare_pairs_the_same_prompts_and_noise(clean_run):
    """A model against itself differs by exactly 0 on every run and metric (same prompts, same noise),
    with the 2-SE rule saying 'inconclusive'; the student against its teacher differs somewhere."""
    _, cfg = clean_run
    same = train.compare(cfg.out_dev, cfg.out_dev, n_prompts=4, batch=2)
    stats = [d for rows in same.values() for metrics in rows.values() for d in metrics.values()]
    assert len(stats) == 2 * len(train.EVAL_RUNS) * 3 + len(train.EVAL_RUNS)   # counting 4 metrics, composition 3
    assert all(d.n == 4 and d.mean == 0 for d in stats)
    assert {experiments.decision(d) for d in stats} == {"inconclusive"}
    moved = train.compare(cfg.out_dev, cfg.out_schnell, n_prompts=4, batch=2)
    assert any(d.mean != 0 for rows in moved.values() for metrics in rows.values() for d in metrics.values())


def test_compare_of_a_folder_without_a_model_is_one_line_and_exit_code_2(tmp_path, monkeypatch, capsys):
    monkeypatch.setattr("sys.argv", ["train.py", "--compare", str(tmp_path / "none"), str(tmp_path / "none")])
    with pytest.raises(SystemExit) as exit_info:
        train.main()
    assert exit_info.value.code == 2
    assert capsys.readouterr().err.strip().splitlines()[-1].endswith(f"model folder not found: {tmp_path / 'none'}")
