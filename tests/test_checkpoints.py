import pytest
import torch

from dmfast import checkpoints
from dmfast.errors import ModelFileError


def test_a_file_reads_back_with_its_format_tag(tmp_path):
    path = checkpoints.save(tmp_path / "m.pt", checkpoints.MASKS, {"masks": torch.zeros(14, 8, 8), "kind": "DM"})
    payload = checkpoints.load(path, checkpoints.MASKS)
    assert payload["format"] == checkpoints.MASKS and payload["version"] == checkpoints.VERSION
    assert torch.equal(payload["masks"], torch.zeros(14, 8, 8))


def test_untagged_files_of_dmfast_0_1_read_as_version_1(tmp_path):
    torch.save({"model": {}, "config": {"arch": "resnet18", "size": 64}}, tmp_path / "classifier.pt")
    assert checkpoints.load(tmp_path / "classifier.pt", checkpoints.CLASSIFIER)["config"]["arch"] == "resnet18"
    # an untagged alignment checkpoint also has model and config: its net_config tells it apart
    torch.save({"model": {}, "net_config": {"input_size": 128}, "config": {}}, tmp_path / "alignment.pt")
    assert "net_config" in checkpoints.load(tmp_path / "alignment.pt", checkpoints.ALIGNMENT)
    with pytest.raises(ValueError, match="alignment.pt: an alignment checkpoint, not a classifier checkpoint"):
        checkpoints.load(tmp_path / "alignment.pt", checkpoints.CLASSIFIER)


def test_wrong_kind_newer_version_and_missing_keys_are_named(tmp_path):
    checkpoints.save(tmp_path / "m.pt", checkpoints.MASKS, {"masks": torch.zeros(14, 8, 8)})
    with pytest.raises(ValueError, match="m.pt: a masks file, not a classifier checkpoint"):
        checkpoints.load(tmp_path / "m.pt", checkpoints.CLASSIFIER)
    torch.save({"format": checkpoints.CLASSIFIER, "version": checkpoints.VERSION + 1, "model": {}, "config": {}},
               tmp_path / "new.pt")
    with pytest.raises(ValueError, match="new.pt: classifier checkpoint of format version 2, written by a newer"):
        checkpoints.load(tmp_path / "new.pt", checkpoints.CLASSIFIER)
    torch.save({"model": {}}, tmp_path / "half.pt")
    with pytest.raises(ValueError, match="half.pt: not a dmfast classifier checkpoint .*'config'"):
        checkpoints.load(tmp_path / "half.pt", checkpoints.CLASSIFIER)
    with pytest.raises(ModelFileError, match="masks file .*nowhere.pt not found"):
        checkpoints.load(tmp_path / "nowhere.pt", checkpoints.MASKS)
    masks = torch.zeros(14, 8, 8)
    masks[3, 2, 2] = float("nan")
    checkpoints.save(tmp_path / "nan.pt", checkpoints.MASKS, {"masks": masks})
    with pytest.raises(ValueError, match="nan.pt: the masks contain NaN"):
        checkpoints.load(tmp_path / "nan.pt", checkpoints.MASKS)


def test_anchor_round_trip_and_bad_anchor(tmp_path):
    anchor = torch.linspace(-1, 1, 64).view(1, 1, 8, 8)
    checkpoints.save_anchor(tmp_path / "anchor.pt", anchor)
    assert torch.equal(checkpoints.load_anchor(tmp_path / "anchor.pt"), anchor[0, 0])
    torch.save(torch.zeros(8, 8), tmp_path / "flat.pt")
    with pytest.raises(ValueError, match="flat.pt: not an anchor image"):
        checkpoints.load_anchor(tmp_path / "flat.pt")


def test_the_seal_names_a_setting_edited_after_writing_and_files_before_seals_still_read(tmp_path):
    state = {"fc.weight": torch.zeros(14, 8), "bn.running_var": torch.ones(8)}
    config = {"arch": "resnet18", "size": 64, "cam_stride": 16}
    path = checkpoints.save(tmp_path / "c.pt", checkpoints.CLASSIFIER, {"model": state, "config": config})
    payload = checkpoints.load(path, checkpoints.CLASSIFIER)
    torch.save({**payload, "config": {**config, "cam_stride": 32}}, tmp_path / "stride.pt")  # same weights fit
    with pytest.raises(ValueError, match="stride.pt: edited after dmfast wrote it: its config cam_stride no longer"):
        checkpoints.load(tmp_path / "stride.pt", checkpoints.CLASSIFIER)
    torch.save({**payload, "model": {**state, "fc.weight": torch.zeros(14, 9)}}, tmp_path / "shape.pt")
    with pytest.raises(ValueError, match="its model weights no longer matches"):
        checkpoints.load(tmp_path / "shape.pt", checkpoints.CLASSIFIER)
    unsealed = {k: v for k, v in payload.items() if k != "seal"}
    torch.save({**unsealed, "config": {**config, "cam_stride": 32}}, tmp_path / "old.pt")  # before seals: read
    assert checkpoints.load(tmp_path / "old.pt", checkpoints.CLASSIFIER)["config"]["cam_stride"] == 32
    resaved = checkpoints.save(tmp_path / "again.pt", checkpoints.CLASSIFIER, {**payload, "config": {**config,
                                                                                                    "size": 128}})
    assert checkpoints.load(resaved, checkpoints.CLASSIFIER)["config"]["size"] == 128  # saving seals anew


@pytest.mark.parametrize("value, words", [(float("nan"), "NaN or infinite values \\(bn.running_var\\)"),
                                          (-1.0, "negative BatchNorm variances \\(bn.running_var\\)")])
def test_weights_that_would_predict_nan_are_refused(tmp_path, value, words):
    state = {"fc.weight": torch.zeros(14, 8), "bn.running_var": torch.full((8,), value)}
    checkpoints.save(tmp_path / "a.pt", checkpoints.ALIGNMENT, {"model": state, "net_config": {"input_size": 32}})
    with pytest.raises(ValueError, match=f"a.pt: its model weights hold {words}"):
        checkpoints.load(tmp_path / "a.pt", checkpoints.ALIGNMENT)


def test_a_classifiers_masks_must_cover_its_cam_grid(tmp_path):
    config = {"arch": "resnet18", "size": 256, "cam_stride": 16}  # 16 x 16 CAMs
    for side, fine in ((16, True), (64, True), (8, False)):
        state = {"fc.weight": torch.zeros(14, 8), "masks": torch.rand(14, side, side)}
        path = checkpoints.save(tmp_path / f"{side}.pt", checkpoints.CLASSIFIER, {"model": state, "config": config})
        if fine:
            checkpoints.load(path, checkpoints.CLASSIFIER)
        else:
            with pytest.raises(ValueError, match="masks it was trained with: masks of 8 x 8 .* at least 16 x 16"):
                checkpoints.load(path, checkpoints.CLASSIFIER)
