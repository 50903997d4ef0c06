"""benchmarks/gpu_check.py: its CPU path (``--dry-run``: the same sections at tiny sizes with lnkit's torch engine,
the vLLM comparisons SKIPPED) writes every section's result and passes; a job runs in a process of its own and
hands its result back; without CUDA the real check stops at once with exit status 2. The real check itself runs
where CUDA and vLLM exist (``pytest -m gpu``)."""

from __future__ import annotations

import importlib.util
import json
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

SCRIPT = Path(__file__).resolve().parents[1] / "benchmarks" / "gpu_check.py"


@pytest.fixture(scope="module")
def gpu_check():
    spec = importlib.util.spec_from_file_location("gpu_check", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    sys.modules["gpu_check"] = module  # dataclasses look their module up while it is being executed
    spec.loader.exec_module(module)
    yield module
    sys.modules.pop("gpu_check", None)


def test_agreement_finds_the_first_divergence_and_the_tolerance_follows_the_dtype(gpu_check):
    a = gpu_check.agreement([[5, 6, 7], [8, 9], [1]], [[5, 6, 7], [8, 4], [2]])
    assert a["identical"] == 1 and a["first_tokens_equal"] == 2 and a["prompts"] == 3
    assert a["first_divergence"] == {"prompt": 1, "position": 1, "got": 9, "want": 4}
    assert a["prefix_share"] == round((1 + 0.5 + 0) / 3, 4)
    assert not gpu_check.judge(a, "float32") and not gpu_check.judge(a, "bfloat16")  # a first token differs
    close = gpu_check.agreement([[5, 6, 7, 8]], [[5, 6, 7, 0]])
    assert gpu_check.judge(close, "bfloat16") and not gpu_check.judge(close, "float32")
    assert gpu_check.agreement([[1, 2]], [[1, 2, 3]])["first_divergence"] == {"prompt": 0, "position": 2, "got": None,
                                                                               "want": 3}


def test_dry_run_writes_every_section_and_passes(gpu_check, tmp_path):
    out = tmp_path / "summary.json"
    rc = gpu_check.main(["--dry-run", "--out", str(out), "--workdir", str(tmp_path / "work"), "--threads", "1",
                         "--model", str(tmp_path / "no_run")])
    s = json.loads(out.read_text())
    sections = s["sections"]
    assert {k: v["status"] for k, v in sections.items()} == {
        "models": "PASS", "consistency": "SKIPPED", "fp8_throughput": "PASS", "grpo_refit": "PASS"}
    assert rc == 0 and s["ok"] and s["backend"] == "torch"
    models = sections["models"]
    assert models["child"]["source"].startswith("built here: no model at")
    # the Puzzle-like child: a no-op attention, a pruned FFN, one KV head; both models servable by vLLM
    assert models["child"]["layers"] == ["attention:2kv/ffn:512", "no_op:0kv/ffn:512", "attention:2kv/ffn:256",
                                         "attention:1kv/ffn:512"]
    assert models["super"]["layers"] == ["attention:1kv/ffn:1024", "attention:1kv/ffn:1792", "no_op:0kv/ffn:1024",
                                         "no_op:0kv/ffn:256"]
    assert models["child"]["vllm_problems"] == [] and models["super"]["vllm_problems"] == []
    tput = sections["fp8_throughput"]
    assert tput["baseline"]["tokens_per_s"] > 0 and tput["fp8"]["tokens_per_s"] > 0 and tput["ratio"] > 0
    for key in ("exact", "fp8"):
        g = sections["grpo_refit"][key]
        assert len(g["steps"]) == 5 and len(g["refits"]) == 5 and all(g["checks"].values()), g["checks"]
        moved = [r for r in g["refits"] if r["moved"] > 0]
        assert moved and all(r["follows_refit"] and r["logprob_gap_now"] < r["logprob_gap_start"] for r in moved)
    assert sections["grpo_refit"]["exact"]["checks"]["greedy_equal_after_each_refit"]
    assert not (tmp_path / "work" / "super").exists()  # model folders go unless --keep-models


def test_a_job_runs_in_a_process_of_its_own(gpu_check, tmp_path):
    cfg = gpu_check.Config(dry_run=True, workdir=str(tmp_path))
    r = gpu_check.isolated("super", cfg, tmp_path, time.time() + 120)
    assert r["status"] == "SKIPPED" and r["reason"] == "no vLLM in --dry-run" and Path(r["log"]).is_file()


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the refusal on a machine without CUDA")
def test_the_real_check_needs_cuda_and_says_so_at_once(tmp_path):
    out = tmp_path / "summary.json"
    r = subprocess.run([sys.executable, str(SCRIPT), "--out", str(out)], capture_output=True, text=True, timeout=120)
    assert r.returncode == 2
    assert r.stderr.strip().startswith("gpu_check: needs CUDA") and len(r.stderr.strip().splitlines()) == 1
    assert not out.exists()


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_the_real_check_passes_on_a_gpu(gpu_check, tmp_path):
    pytest.importorskip("vllm")
    out = tmp_path / "summary.json"
    rc = gpu_check.main(["--out", str(out), "--workdir", str(tmp_path / "work"), "--tput-repeats", "1"])
    s = json.loads(out.read_text())
    assert rc == 0, {k: v["status"] for k, v in s["sections"].items()}
