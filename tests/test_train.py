import dataclasses
import os
import shutil
import socket

import pytest
import torch

from dmfast import checkpoints, train
from dmfast.config import TrainConfig
from dmfast.inference import load_classifier, trained_file
from dmfast.testing import assert_model_file_matches, phantom_with_cache


@pytest.fixture(scope="module")
def phantom(tmp_path_factory):
    return phantom_with_cache(tmp_path_factory.mktemp("phantom"), count=96, size=64, seed=3)


def config(phantom, out, **overrides):
    data, cache = phantom
    base = dict(data=str(data), out=str(out), cache=str(cache), arch="resnet18", size=64, batch=8, epochs=2,
                max_steps=2, lr=1e-3, split="patients", val_fraction=0.2)
    return TrainConfig(**{**base, **overrides})


def test_resume_gives_the_same_weights_as_an_uninterrupted_run(phantom, tmp_path, monkeypatch):
    straight = checkpoints.load(train.run(config(phantom, tmp_path / "a")), checkpoints.CLASSIFIER)
    train.run(config(phantom, tmp_path / "b", epochs=1))
    shutil.copytree(tmp_path / "b", tmp_path / "c")
    with monkeypatch.context() as patch:  # a resume cut off before its model file: the folder is its checkpoint
        patch.setattr(train, "export_model", lambda *a, **k: (_ for _ in ()).throw(KeyboardInterrupt))
        with pytest.raises(KeyboardInterrupt):
            train.run(config(phantom, tmp_path / "c"), resume=True)
    assert trained_file(tmp_path / "c").name == "checkpoint.pt"  # not the first run's stale model.pt
    resumed = checkpoints.load(train.run(config(phantom, tmp_path / "b"), resume=True), checkpoints.CLASSIFIER)
    assert straight["epoch"] == resumed["epoch"] == 1
    for key, value in straight["model"].items():
        assert torch.equal(value, resumed["model"][key]), key
    lines = (tmp_path / "b" / "metrics.jsonl").read_text().splitlines()
    assert len(lines) == 2 and '"mean_auroc"' in lines[-1] and '"val_loss"' in lines[-1]
    assert straight["splits"]["train"] and not set(straight["splits"]["train"]) & set(straight["splits"]["val"])


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _rank_main(rank, world, port, cfg):
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), WORLD_SIZE=str(world), RANK=str(rank),
                      LOCAL_RANK=str(rank))
    torch.set_num_threads(1)
    train.run(cfg)
    torch.distributed.destroy_process_group()


def test_two_process_ddp_step_matches_one_process(phantom, tmp_path):
    # Frozen BatchNorm: with batch statistics each rank would normalise its half batch differently. One plain SGD
    # step moves every weight by lr * its gradient, so the two runs agree to the rounding of the gradient's
    # all-reduce (Adam's first step, lr * g / (|g| + eps), would amplify that rounding where g is tiny).
    two = config(phantom, tmp_path / "ddp", epochs=1, max_steps=1, freeze_bn=True, optimizer="sgd", lr=0.1)
    torch.multiprocessing.start_processes(_rank_main, args=(2, _free_port(), two), nprocs=2, start_method="spawn")
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        single = config(phantom, tmp_path / "single", epochs=1, max_steps=1, freeze_bn=True, optimizer="sgd", lr=0.1)
        one = checkpoints.load(train.run(single), checkpoints.CLASSIFIER)
    finally:
        torch.set_num_threads(threads)
    ddp = checkpoints.load(tmp_path / "ddp" / "checkpoint.pt", checkpoints.CLASSIFIER)
    for key, value in one["model"].items():
        # float32 gradients all-reduced in another order differ by rounding (~1e-7 of the gradient); a wrongly
        # weighted or missing shard would move weights by ~lr * |gradient|
        torch.testing.assert_close(ddp["model"][key], value, rtol=1e-4, atol=1e-5, msg=key)


def test_attention_retraining_starts_from_init_and_keeps_its_masks(phantom, tmp_path, gen):
    base = train.run(config(phantom, tmp_path / "base", epochs=1, max_steps=1))
    masks = torch.zeros(14, 16, 16)
    masks[1, 4:12, 6:14] = 1  # only cardiomegaly has a mask
    torch.save({"masks": masks, "kind": "DM", "has_mask": [i == 1 for i in range(14)]}, tmp_path / "masks.pt")
    retrained = train.run(config(phantom, tmp_path / "dm", epochs=1, max_steps=1, init=str(base),
                             masks=str(tmp_path / "masks.pt")))
    model, cfg, _ = load_classifier(retrained)
    assert torch.equal(model.masks, masks) and cfg.init == str(base)
    assert_model_file_matches(retrained, tmp_path / "model", gen)  # the masks travel inside the model file
    # the retraining started from the base weights: one Adam step of 1e-3 moves no weight further than ~1e-3
    start = checkpoints.load(base, checkpoints.CLASSIFIER)["model"]["layer1.0.conv1.weight"]
    assert (model.layer1[0].conv1.weight - start).abs().max() < 2e-3
    images = torch.rand(2, 1, 64, 64, generator=gen) * 2 - 1
    plain = load_classifier(base)[0]
    with torch.no_grad():  # classes without a mask are unchanged by attention at equal weights
        model.load_state_dict({**plain.state_dict(), "masks": model.masks})
        attended, plain_cams = model(images, cams=True)[1], plain(images, cams=True)[1]
    torch.testing.assert_close(attended[:, [0, 2]], plain_cams[:, [0, 2]])
    assert not torch.allclose(attended[:, 1], plain_cams[:, 1])


def test_bad_init_and_masks_files_are_named(phantom, tmp_path):
    base = train.run(config(phantom, tmp_path / "base", epochs=1, max_steps=1))
    with pytest.raises(ValueError, match="resnet18 with CAM stride 32; this run asks for resnet34"):
        train.run(config(phantom, tmp_path / "x", arch="resnet34", init=str(base)))
    torch.save({"masks": torch.zeros(3, 8, 8)}, tmp_path / "wrong.pt")
    with pytest.raises(ValueError, match="not a dmfast masks file"):
        checkpoints.load(tmp_path / "wrong.pt", checkpoints.MASKS)
    (tmp_path / "junk.pt").write_bytes(b"\x00junk")
    with pytest.raises(ValueError, match="junk.pt: not a readable masks file"):
        checkpoints.load(tmp_path / "junk.pt", checkpoints.MASKS)
    # masks of another grid: not square, or a constant per class, or coarser than the run's CAMs, are refused
    for shape, message in (((14, 64, 32), "masks of 64 x 32 per class; masks are square maps of at least 4 x 4"),
                           ((14, 1, 1), "masks of 1 x 1 per class")):
        checkpoints.save(tmp_path / "grid.pt", checkpoints.MASKS, {"masks": torch.zeros(shape)})
        with pytest.raises(ValueError, match=message):
            train.run(config(phantom, tmp_path / "y", masks=str(tmp_path / "grid.pt")))
    checkpoints.save(tmp_path / "coarse.pt", checkpoints.MASKS, {"masks": torch.zeros(14, 4, 4)})
    with pytest.raises(ValueError, match=r"masks of 4 x 4, coarser than this run's 8 x 8 CAMs \(128 px, CAM stride 16"):
        train.run(config(phantom, tmp_path / "z", size=128, cam_stride=16, cache=str(tmp_path / "cache128"),
                         masks=str(tmp_path / "coarse.pt")))
    assert not (tmp_path / "y").exists() and not (tmp_path / "z").exists()


def test_export_command_writes_a_model_file_and_names_a_bad_source(phantom, tmp_path):
    from click.testing import CliRunner

    from dmfast.cli.main import main
    from dmfast.inference import load_model

    run = train.run(config(phantom, tmp_path / "run", epochs=1, max_steps=1)).parent
    assert (run / "model.pt").is_file()  # every training run ends with its model file
    result = CliRunner().invoke(main, ["export", str(run), "--out", str(tmp_path / "half.pt"), "--half"])
    assert result.exit_code == 0, result.output
    payload = torch.load(tmp_path / "half.pt", weights_only=True)
    assert payload["half"] and payload["classifier"]["state"]["fc.weight"].dtype == torch.float16
    assert payload["written_by"]["torch"] == torch.__version__ and payload["aligner"] is None
    assert load_model(tmp_path / "half.pt").size == 64
    result = CliRunner().invoke(main, ["export", str(run / "splits.json"), "--out", str(tmp_path / "x.pt")])
    assert result.exit_code == 1 and "splits.json: not a readable model file or classifier checkpoint" in result.output


def test_predict_reports_boxes_in_the_pixels_of_images_of_any_size(phantom, tmp_path, gen):
    from PIL import Image

    from dmfast.inference import load_model, to_square

    model = load_model(train.run(config(phantom, tmp_path / "run", epochs=1, max_steps=2)).parent / "model.pt")
    wide = torch.randint(0, 256, (48, 64), generator=gen, dtype=torch.uint8)
    padded = torch.zeros(64, 64, dtype=torch.uint8)
    padded[8:56] = wide  # the centred square predict makes of it
    Image.fromarray(wide.numpy()).save(tmp_path / "wide.png")
    big = to_square(torch.randint(0, 256, (128, 128), generator=gen, dtype=torch.uint8).numpy(), 128).pixels
    small = to_square(big, 64).pixels
    found = model.predict([tmp_path / "wide.png", padded, big, small], min_probability=0, max_boxes=2)
    assert [(r.width, r.height) for r in found] == [(64, 48), (64, 64), (128, 128), (64, 64)]
    # the same pixels at two places of one batch: the CPU kernels may round a probability an ulp apart
    assert found[0].probabilities == pytest.approx(found[1].probabilities, rel=1e-5) and len(found[0].boxes) == 14

    def same(got: list, want: list) -> bool:  # corners exactly, scores (p times the region's mean) to rounding
        return [b[:4] for b in got] == [b[:4] for b in want] and \
            [b[4] for b in got] == pytest.approx([b[4] for b in want], rel=1e-5)

    for name, boxes in found[1].boxes.items():  # the square's boxes, moved up by the padding and clipped
        want = [[x0, min(max(y0 - 8, 0), 48), x1, min(max(y1 - 8, 0), 48), s] for x0, y0, x1, y1, s in boxes]
        assert same(found[0].boxes[name], want), name
    for name, boxes in found[3].boxes.items():  # a 2x larger image: the same boxes at twice the coordinates
        assert same(found[2].boxes[name], [[2 * v for v in box[:4]] + box[4:] for box in boxes]), name
    assert model.predict([padded], min_probability=1)[0].boxes == {}  # a briefly trained model: p < 1
    with pytest.raises(ValueError, match="min_probability must be a finite number in"):
        model.predict([padded], min_probability=1.01)
    with pytest.raises(ValueError, match="image 0: float32 \\(3, 8, 8\\); expected uint8"):
        model.predict([torch.zeros(3, 8, 8)])


def test_the_best_epoch_survives_a_resume_and_the_curves_are_written(phantom, tmp_path, monkeypatch):
    import json

    import numpy as np
    from PIL import Image

    scores = iter([0.9, 0.7, float("nan"), 0.8])  # validation mean AUROC of epochs 1, 2 | (resumed) 3, 4

    def fake_auroc(*args, **kwargs):
        score = next(scores)
        return {"auroc": {"Mass": score}, "mean_auroc": score}

    monkeypatch.setattr(train, "evaluate_auroc", fake_auroc)
    train.run(config(phantom, tmp_path, epochs=2, max_steps=1))  # "killed" after epoch 2 of 4
    last = train.run(config(phantom, tmp_path, epochs=4, max_steps=1), resume=True)
    state = checkpoints.load(last, checkpoints.CLASSIFIER)
    assert state["best"] == {"epoch": 1, "mean_auroc": 0.9} and [m["epoch"] for m in state["history"]] == [1, 2, 3, 4]
    best = checkpoints.load(tmp_path / "best.pt", checkpoints.CLASSIFIER)
    assert best["epoch"] == 0 and best["metrics"]["mean_auroc"] == 0.9 and "optimizer" not in best
    lines = (tmp_path / "metrics.jsonl").read_text().splitlines()
    assert [json.loads(line)["epoch"] for line in lines] == [1, 2, 3, 4]  # strict JSON: NaN written as null
    assert json.loads(lines[2])["mean_auroc"] is None and "NaN" not in "".join(lines)
    picture = np.asarray(Image.open(tmp_path / "training.png"))
    assert picture.ndim == 3 and picture.shape[1] > picture.shape[0] > 200
    assert ((picture[..., 0] > 200) & (picture[..., 1] < 80)).any()  # the red mean AUROC curve


def test_tensorboard_logs_the_epoch_scalars(phantom, tmp_path):
    pytest.importorskip("tensorboard", reason="tensorboard is in the test extra")
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    train.run(config(phantom, tmp_path, epochs=1, max_steps=1, tensorboard=True))
    events = EventAccumulator(str(tmp_path / "tensorboard"))
    events.Reload()
    tags = set(events.Tags()["scalars"])
    assert {"loss", "lr", "mean_auroc", "auroc/Mass"} <= tags
    assert events.Scalars("loss")[0].step == 1


def test_older_runs_resume_with_their_last_line_per_epoch_and_tensorboard_is_named_when_missing(tmp_path,
                                                                                                 monkeypatch):
    import json
    import sys

    lines = [{"epoch": 1, "loss": 9.0}, {"epoch": 1, "loss": 1.0}, {"note": "no epoch"}, {"epoch": 2, "loss": 0.5},
             {"epoch": 3, "loss": 0.1}]  # an older dmfast appended runs into one file
    (tmp_path / "metrics.jsonl").write_text("".join(json.dumps(m) + "\n" for m in lines))
    history = train._earlier_history(tmp_path, {"epoch": 1})  # checkpoint after epoch 2
    assert history == [{"epoch": 1, "loss": 1.0}, {"epoch": 2, "loss": 0.5}]
    monkeypatch.setitem(sys.modules, "torch.utils.tensorboard", None)  # as if tensorboard were not installed
    with pytest.raises(ValueError, match="pip install 'dmfast\\[tensorboard\\]'"):
        train._tensorboard(tmp_path)


def test_compiled_training_matches_eager_and_records_its_timing(phantom, tmp_path, monkeypatch):
    """--compile runs the training steps through torch.compile (graph capture tested with backend aot_eager): the
    same weights as eager training to float rounding. metrics.jsonl times the steps, the wait for data and the
    validation pass."""
    from dmfast import models

    monkeypatch.setattr(models, "COMPILE_BACKEND", "aot_eager")
    runs = {name: checkpoints.load(train.run(config(phantom, tmp_path / name, epochs=1, compile=name == "compiled")),
                                   checkpoints.CLASSIFIER) for name in ("eager", "compiled")}
    for key, value in runs["eager"]["model"].items():
        torch.testing.assert_close(runs["compiled"]["model"][key], value, rtol=1e-4, atol=1e-5, msg=key)
    metrics = runs["compiled"]["metrics"]
    assert metrics["step_seconds"] > 0 and 0 <= metrics["data_wait_seconds"] <= metrics["step_seconds"]
    assert metrics["validation_seconds"] > 0 and metrics["mean_auroc"] == metrics["mean_auroc"]


def test_fp32_steps_leave_autocast_off_for_the_first_steps_across_epochs_and_a_resume(phantom, tmp_path,
                                                                                     monkeypatch):
    """--fp32-steps N: a bf16 run's first N optimisation steps run in float32, counted across epochs and kept by a
    resume; the steps after run under bf16 autocast."""
    from dmfast import training

    seen, loss = [], training.weighted_bce

    def spy(logits, *args, **kwargs):
        if logits.requires_grad:  # a training step's loss, not validation's
            seen.append(torch.get_autocast_dtype("cpu") if torch.is_autocast_enabled("cpu") else None)
        return loss(logits, *args, **kwargs)

    monkeypatch.setattr(training, "weighted_bce", spy)
    train.run(config(phantom, tmp_path / "a", precision="bf16", fp32_steps=3, epochs=1))  # 2 steps per epoch
    train.run(config(phantom, tmp_path / "a", precision="bf16", fp32_steps=3), resume=True)
    assert seen == [None, None, None, torch.bfloat16]
    older = {k: v for k, v in dataclasses.asdict(config(phantom, tmp_path / "b", precision="bf16")).items()
             if k != "fp32_steps"}  # a run from before --fp32-steps resumes as it began: bf16 from its first step
    assert train._resumed_config(config(phantom, tmp_path / "b"), older, tmp_path, 1).fp32_steps == 0
    assert TrainConfig.fp32_steps > 0  # a new run's default


def test_a_run_without_cache_keeps_its_training_images_statistics(tmp_path):
    """No --cache: the run's default cache is where the model file's out-of-distribution statistics come from."""
    from dmfast.phantom import synthesize

    data = synthesize(tmp_path / "data", count=40, size=64, seed=2)
    checkpoint = train.run(TrainConfig(data=str(data), out=str(tmp_path / "run"), arch="resnet18", size=64, batch=8,
                                       epochs=1, max_steps=1, split="patients", val_fraction=0.2))
    model = checkpoints.load(checkpoint.parent / "model.pt", checkpoints.MODEL)
    assert model["ood"] is not None and model["ood"]["calibration"] == "validation"
