import dataclasses
import json
import subprocess
import sys

import click
import pytest
import torch
from click.testing import CliRunner

import dmfast
from dmfast.cli.main import main
from dmfast.config import AlignConfig, DemoConfig, EvalConfig, MasksConfig, PredictConfig, TrainConfig, defaults


def test_version_and_help():
    runner = CliRunner()
    result = runner.invoke(main, ["--version"])
    assert result.exit_code == 0 and dmfast.__version__ in result.output
    result = runner.invoke(main, ["--help"])
    assert result.exit_code == 0
    for command in ("align", "train", "masks", "eval", "demo"):
        assert command in result.output


def test_console_script_is_installed():
    out = subprocess.run([sys.executable, "-m", "dmfast.cli.main", "--version"], capture_output=True, text=True)
    assert out.returncode == 0 and dmfast.__version__ in out.stdout


def test_demo_reports_a_missing_data_folder(tmp_path):
    result = CliRunner().invoke(main, ["demo", "--out", str(tmp_path), "--data", str(tmp_path / "nowhere")])
    assert result.exit_code == 2 and "does not exist" in result.output


def test_attention_cam_benchmark_script_writes_json(tmp_path):
    from benchmarks.attention_cam import main as bench_main

    out = tmp_path / "bench.json"
    bench_main(["--batch", "2", "--channels", "8", "--size", "4", "--classes", "3", "--min-run-time", "0.01",
                "--rounds", "1", "--out", str(out)])
    payload = json.loads(out.read_text())
    impls = {r["implementation"] for r in payload["results"]}
    assert impls == {"fused", "eager einsum", "eager bmm", "literal"}
    assert len(payload["results"]) == 4 * 4


def test_cam_boxes_benchmark_script_writes_json(tmp_path):
    from benchmarks.cam_boxes import main as bench_main

    out = tmp_path / "bench.json"
    bench_main(["--batch", "2", "--classes", "2", "--image-size", "64", "--min-run-time", "0.01", "--rounds", "1",
                "--out", str(out)])
    payload = json.loads(out.read_text())
    impls = {r["implementation"] for r in payload["results"]}
    assert {"fused", "scipy label + find_objects"} <= impls
    assert payload["config"]["fused_ms_per_megapixel"] > 0


def test_data_loading_benchmark_and_data_commands(tmp_path):
    runner = CliRunner()
    result = runner.invoke(main, ["synth", str(tmp_path / "ph"), "--count", "40", "--size", "64", "--seed", "2"])
    assert result.exit_code == 0, result.output
    result = runner.invoke(main, ["prepare", str(tmp_path / "ph"), "--size", "32", "--cache", str(tmp_path / "c")])
    assert result.exit_code == 0, result.output
    result = runner.invoke(main, ["prepare", str(tmp_path / "missing-folder")])
    assert result.exit_code != 0
    (tmp_path / "ph" / "Data_Entry_2017.csv").write_text("Image Index\n")
    result = runner.invoke(main, ["prepare", str(tmp_path / "ph"), "--cache", str(tmp_path / "c2")])
    assert result.exit_code == 1 and "header lacks the columns" in result.output
    from benchmarks.data_loading import main as bench_main

    runner.invoke(main, ["synth", str(tmp_path / "ph2"), "--count", "40", "--size", "64"])
    out = tmp_path / "bench.json"
    bench_main(["--data", str(tmp_path / "ph2"), "--size", "32", "--batch", "8", "--min-run-time", "0.05",
                "--out", str(out)])
    rates = json.loads(out.read_text())["config"]["images_per_second"]
    assert rates["cache"] > 0 and rates["decode PNGs"] > 0


def test_benchmark_script_writes_json(tmp_path):
    from benchmarks.affine_smooth import main as bench_main

    out = tmp_path / "bench.json"
    bench_main(["--batch", "1", "--size", "32", "--pool", "4", "--min-run-time", "0.01", "--rounds", "1",
                "--no-compile", "--threads", str(torch.get_num_threads()), "--out", str(out)])
    payload = json.loads(out.read_text())
    assert payload["environment"]["torch"] == torch.__version__
    impls = {(r["case"], r["implementation"]) for r in payload["results"]}
    assert ("forward", "fused") in impls and ("forward+backward (theta)", "eager") in impls
    assert all(r["median_ms"] > 0 for r in payload["results"])


# DATA_DIR, MODEL and INPUTS are arguments; the T(IoU) levels are fixed
NOT_ON_THE_COMMAND_LINE = {"data", "model", "inputs", "overlap_thresholds"}
RENAMED = {"masks_files": "masks", "box_threshold": "box_thresholds"}  # eval's repeatable NAME=PATH and level list
SHOWN = {"asymmetric": ",".join, "box_thresholds": lambda levels: ",".join(f"{t:g}" for t in levels)}


@pytest.mark.parametrize("command,config", [("train", TrainConfig), ("align", AlignConfig), ("masks", MasksConfig),
                                            ("eval", EvalConfig), ("predict", PredictConfig), ("demo", DemoConfig)])
def test_every_setting_is_an_option_with_the_config_default(command, config):
    options = {RENAMED.get(p.name, p.name): p for p in main.commands[command].params if isinstance(p, click.Option)}
    for field in dataclasses.fields(config):
        if field.name in NOT_ON_THE_COMMAND_LINE:
            continue
        assert field.name in options, f"dmfast {command} has no option for {field.name}"
        if field.name in defaults(config) and not options[field.name].multiple:
            want = SHOWN.get(field.name, lambda value: value)(defaults(config)[field.name])
            assert options[field.name].default == want, (command, field.name)


def test_predict_benchmark_writes_both_rates(tmp_path):
    from benchmarks.predict import main as bench_main

    out = tmp_path / "bench.json"
    bench_main(["--sizes", "32", "--arch", "resnet18", "--images", "4", "--rounds", "1", "--out", str(out)])
    measured = json.loads(out.read_text())["config"]["measured"]["32"]
    assert measured["images"] >= 4 and measured["images_per_second"]["predict"] > 0
    assert measured["images_per_second"]["eval"] > 0


def test_pipeline_benchmark_runs_every_stage_at_each_size(tmp_path):
    from benchmarks.pipeline import RELEASES, STAGES
    from benchmarks.pipeline import main as bench_main

    out = tmp_path / "bench.json"
    bench_main(["--sizes", "12", "24", "--pool", "3", "--arch", "resnet18", "--size", "128", "--batch", "4",
                "--train-steps", "1", "--workers", "1", "--work", str(tmp_path), "--out", str(out)])
    payload = json.loads(out.read_text())
    assert [m["images"] for m in payload["measured"]] == [12, 24]
    for measured in payload["measured"]:
        assert set(measured["stages"]) == set(STAGES)
        for name, stage in measured["stages"].items():  # train's images: its validation split (may be empty)
            assert stage["seconds"] > 0 and stage["peak_rss_mib"] >= stage["peak_anon_mib"] > 0
            assert stage["images"] > 0 or name == "train"
        assert measured["stages"]["predict"]["images"] == measured["stages"]["prepare"]["images"] == measured["images"]
    assert all(len(v) == 1 for v in payload["seconds_per_added_image"].values())
    assert set(payload["seconds_per_added_image"]) == set(STAGES) - {"train"}
    assert all(len(v) == 1 for v in payload["seconds_per_added_image"].values())
    assert set(payload["projected_hours"]) == set(RELEASES)
    assert payload["precision"] == {"inference": "fp32", "training": "fp32"}  # DMFAST_CPU_BF16=0 in the tests


def test_precision_benchmark_times_each_precision_and_layout(tmp_path):
    from benchmarks.precision import VARIANTS
    from benchmarks.precision import main as bench_main

    out = tmp_path / "bench.json"
    bench_main(["--arch", "resnet18", "--size", "32", "--batch", "2", "--train-size", "32", "--train-batch", "2",
                "--min-run-time", "0.01", "--rounds", "1", "--models", "", "--out", str(out)])
    config = json.loads(out.read_text())["config"]
    assert config["trained_passes"] is None and config["training_runs"] is None  # tests/test_demo.py runs those
    assert list(config["gradient_error"]) == ["random weights"]  # no demo model to take trained weights from
    assert set(config["images_per_second"]["inference"]) == set(VARIANTS) == set(config["max_probability_difference"])
    assert config["max_probability_difference"]["fp32"] == 0 and config["max_probability_difference"]["bf16"] < 0.1


def test_train_throughput_benchmark_reports_the_step_time_split(tmp_path):
    from benchmarks.train_throughput import main as bench_main

    out = tmp_path / "bench.json"
    bench_main(["--arch", "resnet18", "--size", "64", "--batch", "4", "--steps", "2", "--images", "40", "--out",
                str(out)])
    result = json.loads(out.read_text())["result"]
    assert result["images_per_second"] > 0 and 0 <= result["data_wait_share"] <= 1
    assert result["precision"] == "fp32"  # training on the CPU
