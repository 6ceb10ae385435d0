import pytest
import torch

from dmfast import checkpoints


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
    with pytest.raises(FileNotFoundError, match="masks file .*nowhere.pt not found"):
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
