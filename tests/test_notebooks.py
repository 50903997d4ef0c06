"""Every stage notebook executed by papermill with the smoke parameters, and the runner's behaviour
around it: skip when complete, rerun with --force, a failing stage named with its cell, corrupt
checkpoints named, earlier artifacts left intact."""

from __future__ import annotations

import json
import shutil

import pytest
import yaml

from lnkit import runs
from lnkit.checkpoints import load_model
from lnkit.io import CheckpointError


@pytest.fixture(scope="module")
def smoke(tmp_path_factory):
    """The smoke run, executed once for the module, into a temporary run folder."""
    tmp = tmp_path_factory.mktemp("smoke")
    spec = yaml.safe_load(open(runs.REPO / "papermill_runs" / "smoke.yaml"))
    spec["run"] = f"test-{tmp.name}"
    spec["run_dir"] = str(tmp / "run")
    path = tmp / "smoke.yaml"
    path.write_text(yaml.safe_dump(spec))
    assert runs.main([str(path)]) == 0
    yield {"path": path, "run_dir": tmp / "run", "spec": spec, "out": runs.OUTPUT / spec["run"]}
    shutil.rmtree(runs.OUTPUT / spec["run"], ignore_errors=True)


def test_every_stage_notebook_runs_and_writes_its_artifacts(smoke):
    for stage in smoke["spec"]["stages"]:
        d = smoke["run_dir"] / stage
        assert (d / "_COMPLETE.json").exists() and (d / "metrics.json").exists() and (d / "params.json").exists()
        assert (smoke["out"] / f"{stage}.ipynb").exists()
    d = smoke["run_dir"] / "00_parent"
    metrics = json.loads((d / "metrics.json").read_text())
    assert metrics["parameters"] > 0 and "off/math/1" in metrics["accuracy"]
    assert (d / "train_log.csv").read_text().count("\n") == 1 + smoke["spec"]["stages"]["00_parent"]["steps"]
    assert (d / "eval_summary.csv").exists() and (d / "loss.png").exists() and (d / "accuracy.png").exists()
    model, tok = load_model(d / "model")
    assert model.config.num_hidden_layers == 2 and tok.chat_template
    lib = smoke["run_dir"] / "01_block_library"
    assert (lib / "losses.csv").read_text().count("\n") > 4 and (lib / "library_losses.png").exists()
    import csv

    search = smoke["run_dir"] / "02_architecture_search"
    rows = list(csv.DictReader(open(search / "frontier.csv")))
    assert {r["kind"] for r in rows} == {"parent", "puzzle", "baseline"}
    puzzle = [r for r in rows if r["kind"] == "puzzle"][0]
    assert float(puzzle["priced_decode_fraction"]) <= 0.7 + 1e-9 and puzzle["status"] == "optimal"
    child, _ = load_model(search / "children" / "budget_0.70")
    assert child.config.model_type == "nemotron-nas"
    # headless, the explorer shows its first state (budget 0.5) as text, without a widget (lnkit.explore)
    nb = json.loads((smoke["out"] / "02_architecture_search.ipynb").read_text())
    cell = next(c for c in nb["cells"] if "explore.interact(" in "".join(c["source"]))
    text = "".join("".join(o.get("text", "")) for o in cell["outputs"])
    assert "priced decode time" in text or "infeasible" in text, text
    assert not any("application/vnd.jupyter.widget-view+json" in o.get("data", {}) for o in cell["outputs"])


def _without_attention(parent, layer: int):
    """The parent as a nemotron-nas child with one layer's attention removed (a damaged child)."""
    from lnkit.model import NemotronNasConfig, NemotronNasForCausalLM, from_llama

    nas = from_llama(parent)
    raw = nas.config.to_dict()
    raw["block_configs"][layer]["attention"] = {"no_op": True, "replace_with_linear": False, "n_heads_in_group": None}
    child = NemotronNasForCausalLM(NemotronNasConfig.from_dict(raw)).eval()
    drop = (f"model.layers.{layer}.input_layernorm", f"model.layers.{layer}.self_attn")
    child.load_state_dict({k: v for k, v in nas.state_dict().items() if not k.startswith(drop)})
    return child


def test_every_figure_is_redrawn_from_the_files_the_run_wrote(smoke):
    """Figures come from files, not from a kernel: delete them all and redraw them from the run folder."""
    from lnkit import plots

    run_dir = smoke["run_dir"]
    for name, (stage, file, _) in plots.FIGURES.items():
        assert (run_dir / stage / file).is_file(), f"the notebook of {stage} did not draw {name}"
        (run_dir / stage / file).unlink()
    assert plots.main([str(run_dir)]) == 0
    assert all((run_dir / stage / file).stat().st_size > 1000 for stage, file, _ in plots.FIGURES.values())
    assert not list(run_dir.glob("**/*.tmp-*"))


def test_every_stage_has_a_headline_for_the_runners_table(smoke):
    from lnkit.runs import headline
    from lnkit.stages import PIPELINE

    for module in PIPELINE:
        metrics = json.loads((smoke["run_dir"] / module.NAME / "metrics.json").read_text())
        line = headline(module.NAME, metrics)
        assert isinstance(line, str) and len(line) > 10, module.NAME


def test_a_notebook_pointed_at_the_run_folder_gets_the_runs_parameters(smoke):
    """The runner keeps the resolved run file in the run folder: a notebook given only that folder builds
    exactly the parameters the runner used (same digest), and the smoke run wrote no figure to figures/."""
    from lnkit.runs import REPO, notebook_params
    from lnkit.stages import PIPELINE

    for module in PIPELINE:
        p = notebook_params(module, {"run": str(smoke["run_dir"])})
        recorded = json.loads((smoke["run_dir"] / module.NAME / "params.json").read_text())["digest"]
        assert p.digest() == recorded, module.NAME
        assert p.figures_dir == ""
    assert not any((REPO / "figures").glob("*.tmp-*"))


# The per-stage checks run before the tests below, which rerun, corrupt or fail stages of the smoke run.


def test_ffn_fusion_stage_fuses_the_child_exactly_in_the_released_format(smoke, tmp_path):
    """Stage 03: the smoke notebook's artifacts, then the stage on the smoke parent with layer 1's attention
    removed (the 2-layer smoke child may have no attention-free run), fused whole (threshold 1.0)."""
    import csv

    import torch

    import lnkit.model  # noqa: F401  (children are nemotron-nas checkpoints)
    from lnkit import stage
    from lnkit.checkpoints import save_model
    from lnkit.fusion import attention_free_runs, parallel
    from lnkit.stages.fusion import Params as FusionParams
    from lnkit.stages.fusion import run_fusion

    d = smoke["run_dir"] / "03_ffn_fusion"
    metrics = json.loads((d / "metrics.json").read_text())
    src = json.loads((d / "source.json").read_text())
    child, _ = load_model(smoke["run_dir"] / src["child_dir"])
    runs_ = attention_free_runs(child.config)
    assert json.loads((d / "groups.json").read_text())["fused"] == runs_ == metrics["runs"]
    dep = list(csv.DictReader(open(d / "dependency.csv")))
    assert len(dep) == sum(len(r) * (len(r) + 1) // 2 for r in runs_) and (d / "dependency.png").exists()
    assert metrics["depth_after"] == metrics["depth_before"] - sum(len(g) - 1 for g in runs_)

    run = tmp_path / "run"
    shutil.copytree(smoke["run_dir"] / "00_parent", run / "00_parent")
    search = run / "02_architecture_search"
    (search / "children").mkdir(parents=True)
    (search / "_COMPLETE.json").write_text("{}")
    (search / "best_2x.json").write_text(json.dumps({"label": "no attention 1"}))
    parent, tok = load_model(run / "00_parent" / "model")
    child = _without_attention(parent, 1)
    child.generation_config = parent.generation_config
    save_model(child, tok, search / "children" / "no_attention_1")
    p = FusionParams(run_dir=str(run), figures_dir="", progress=False, threshold=1.0, calib_rows=4, calib_len=32,
                     eval_n=2, eval_max_new_tokens=8, batch_size=2, prompt_len=8, decode_len=4, timing_repeats=1,
                     reference="")
    stage.start(p)
    r = run_fusion(p)
    assert r["child"] == "no attention 1" and r["runs"] == r["fused_groups"] == [[0, 1]]
    assert r["depth_before"] == 3 and r["depth_after"] == 2 and r["max_logit_err_vs_parallel"] < 1e-4
    assert r["kl_child_to_fused"] > 0  # an approximation of the sequential child, not the same model
    fused, _ = load_model(run / "03_ffn_fusion" / "model")
    bc = fused.config.block_configs
    assert bc[0].ffn.width(32) == 2 * 64 and bc[1].attention.kind == bc[1].ffn.kind == "no_op"
    ids = torch.randint(3, child.config.vocab_size, (2, 16), generator=torch.Generator().manual_seed(0))
    with torch.no_grad(), parallel(child, [[0, 1]]):
        want = child(input_ids=ids).logits
    torch.testing.assert_close(fused(input_ids=ids).logits, want, atol=1e-4, rtol=1e-5)
    tiny = next(x for x in r["deploy"] if x["setting"] == "tiny child")
    assert tiny["fused_allreduces"] == tiny["unfused_allreduces"] - 1 and tiny["latency_ratio"] < 1
    assert json.loads((run / "03_ffn_fusion" / "source.json").read_text()) == {
        "child": "no attention 1", "child_dir": "02_architecture_search/children/no_attention_1"}


def test_reasoning_data_and_sft_stages_write_their_artifacts(smoke):
    """Stages 05 and 06 in the smoke run: the blend loads in the released schema, the report and figures
    are there, SFT trained every step and evaluated both modes."""
    from lnkit.data.released import load_rows

    d5 = smoke["run_dir"] / "05_reasoning_data"
    rows, skipped = load_rows(d5 / "sft.jsonl")
    assert rows and not skipped and {r["reasoning"] for r in rows} <= {"on", "off"}
    report = json.loads((d5 / "report.json").read_text())
    assert report["funnel"][0]["filter"] == "generated" and report["audit"]["leaked_prompts_kept"] == 0
    assert (d5 / "report.csv").exists() and (d5 / "curation_funnel.png").exists()
    d6 = smoke["run_dir"] / "06_reasoning_sft"
    metrics = json.loads((d6 / "metrics.json").read_text())
    assert set(metrics["compliance"]) == {"off", "on"} and "leakage_off" in metrics
    steps = smoke["spec"]["stages"]["06_reasoning_sft"]["steps"]
    assert (d6 / "train_log.csv").read_text().count("\n") == 1 + steps
    assert (d6 / "on_vs_off.png").exists() and (d6 / "eval_summary.json").exists()
    model, tok = load_model(d6 / "model")
    assert tok.chat_template


def test_distillation_stage_writes_each_student_and_recovers_a_damaged_child(smoke, tmp_path):
    """Stage 04 in the smoke run: the fused child distilled into model/, the child before fusion into
    students/unfused/model, per-student logs and the Table 1 analog. The smoke children are nearly the
    parent already, so the real outcome is checked on a child of the smoke parent with layer 1's attention
    removed: the stage's own distill_student brings it closer to the parent on freshly packed rows."""
    import csv

    import torch

    from lnkit.checkpoints import save_model
    from lnkit.stages.distill import Params as DistillParams
    from lnkit.stages.distill import distill_student, parent_mix_of
    from lnkit.train.batches import PackedBatcher
    from lnkit.train.distill import make_loss_fn

    run = smoke["run_dir"]
    d, spec = run / "04_distillation", smoke["spec"]["stages"]["04_distillation"]
    metrics = json.loads((d / "metrics.json").read_text())
    assert metrics["model"] == "03_ffn_fusion" and list(metrics["students"]) == ["03_ffn_fusion", "unfused"]
    src = json.loads((run / "03_ffn_fusion" / "source.json").read_text())
    assert metrics["students"]["unfused"]["source"] == src["child_dir"]
    for name, s in metrics["students"].items():
        log = list(csv.DictReader(open(d / "students" / name / "train_log.csv")))
        assert [int(r["step"]) for r in log] == list(range(spec["steps"])) and s["steps"] == spec["steps"]
        assert {"kl", "cosine", "lm", "rollbacks"} <= set(log[0]) and s["rollbacks"] == 0
        assert set(s["accuracy_before"]) == set(s["accuracy_after"]) == {"all", "math", "science", "code",
                                                                          "instruct", "chat"}
        assert s["speedup"] > 0 and "accuracy_kept" in s
    table = list(csv.DictReader(open(d / "table.csv")))
    assert [r["phase"] for r in table] == ["parent"] + ["before", "after"] * 2
    assert (d / "loss.png").exists() and (d / "table.png").exists()
    fused, _ = load_model(run / "03_ffn_fusion" / "model")
    distilled, _ = load_model(d / "model")
    assert distilled.config.block_configs == fused.config.block_configs
    assert any(not torch.equal(a, b) for a, b in zip(distilled.state_dict().values(), fused.state_dict().values()))
    unfused, _ = load_model(d / "students" / "unfused" / "model")
    assert unfused.config.block_configs == load_model(run / src["child_dir"])[0].config.block_configs

    parent, tok = load_model(run / "00_parent" / "model")
    child = _without_attention(parent, 1)
    kid_run = tmp_path / "run"
    shutil.copytree(run / "00_parent", kid_run / "00_parent")
    save_model(child, tok, kid_run / "kids" / "no_attention_1")
    p = DistillParams(run_dir=str(kid_run), students=["kids/no_attention_1"], steps=20, rows=2, row_len=128,
                      warmup=2, progress=False)
    examples = parent_mix_of(kid_run, tok)
    fresh = PackedBatcher(examples, 4, 128, tok.pad_token_id, seed=99)(10**6)
    fresh.pop("n_tokens")
    kl = make_loss_fn(parent, pad_id=tok.pad_token_id)
    with torch.no_grad():
        before = kl(child, fresh)["kl"]
    batches = PackedBatcher(examples, p.rows, p.row_len, tok.pad_token_id, seed=p.seed + 4)
    student, rows = distill_student(p, p.students[0], parent, tok, batches, tmp_path / "out")
    with torch.no_grad():
        after = kl(student, fresh)["kl"]
    assert len(rows) == 20 and after < 0.5 * before, (before, after)


def test_completed_stage_is_skipped_and_force_reruns(smoke, capsys):
    marker = smoke["run_dir"] / "00_parent" / "_COMPLETE.json"
    before = marker.read_text()
    assert runs.main([str(smoke["path"])]) == 0
    assert "skipped" in capsys.readouterr().out and marker.read_text() == before


def test_force_reruns_from_scratch_not_from_the_last_checkpoint(smoke, capsys):
    """A forced rerun must recompute: a training checkpoint of the earlier attempt (same parameters) would
    otherwise be resumed at its last step, and nothing would be trained again."""
    d = smoke["run_dir"] / "07_grpo"
    (d / "leftover.txt").write_text("from the earlier attempt")
    assert (d / "train_state").is_dir()
    assert runs.main([str(smoke["path"]), "--only", "07_grpo", "--force"]) == 0
    out = capsys.readouterr().out
    assert "--force: the earlier attempt set aside" in out  # its checkpoint with it: nothing to resume
    assert not (d / "leftover.txt").exists() and (d / "_COMPLETE.json").exists()
    assert not (smoke["run_dir"] / ".07_grpo.before-force").exists()  # dropped once the rerun completed


def test_corrupt_checkpoint_is_named_and_not_overwritten(smoke):
    weights = smoke["run_dir"] / "00_parent" / "model" / "model.safetensors"
    data = weights.read_bytes()
    try:
        weights.write_bytes(data[: len(data) // 2])
        with pytest.raises(CheckpointError, match=r"model\.safetensors is truncated"):
            load_model(weights.parent)
        assert weights.stat().st_size == len(data) // 2  # nothing rewrote it
    finally:
        weights.write_bytes(data)


def test_failing_stage_names_notebook_and_cell_and_keeps_earlier_artifacts(smoke, capsys, tmp_path):
    spec = json.loads(json.dumps(smoke["spec"]))
    broken = tmp_path / "broken-llama"  # exists, so validation passes; loading it fails inside a cell
    broken.mkdir()
    (broken / "config.json").write_text("{not json")
    spec["stages"]["00_parent"]["parent_checkpoint"] = str(broken)
    path = tmp_path / "failing.yaml"
    path.write_text(yaml.safe_dump(spec))
    model_dir = smoke["run_dir"] / "00_parent" / "model"
    before = sorted(p.name for p in model_dir.iterdir())
    assert runs.main([str(path), "--force"]) == 1
    err = capsys.readouterr().err
    assert "stage 00_parent failed in notebook" in err and "cell" in err and "broken-llama" in err
    assert sorted(p.name for p in model_dir.iterdir()) == before
    # the failed attempt removed the completion marker: the next plain run redoes the stage
    assert not (smoke["run_dir"] / "00_parent" / "_COMPLETE.json").exists()


def test_run_killed_mid_stage_resumes_from_its_checkpoint(smoke, tmp_path):
    """Kill the whole runner (papermill and its kernel) during training; the rerun cleans up, resumes
    from the last training checkpoint and completes."""
    import os
    import signal
    import subprocess
    import sys
    import time

    import nbformat

    spec = json.loads(json.dumps(smoke["spec"]))
    spec["run"] = smoke["spec"]["run"] + "-kill"
    spec["run_dir"] = str(tmp_path / "run")
    spec["stages"] = {"00_parent": {**spec["stages"]["00_parent"], "steps": 600}}  # the stage that is killed
    path = tmp_path / "kill.yaml"
    path.write_text(yaml.safe_dump(spec))
    cmd = [sys.executable, "-m", "lnkit.runs", str(path)]
    proc = subprocess.Popen(cmd, start_new_session=True, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    state = tmp_path / "run" / "00_parent" / "train_state"
    deadline = time.time() + 120
    while not state.exists() and time.time() < deadline and proc.poll() is None:
        time.sleep(0.1)
    assert state.exists(), "training never checkpointed"
    # Kill the job as a scheduler would: the runner and every process under it (the kernel may sit in a
    # session of its own).
    family = _descendants(proc.pid)
    os.killpg(proc.pid, signal.SIGKILL)
    for pid in family:
        try:
            os.kill(pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
    proc.wait()
    assert not (tmp_path / "run" / "00_parent" / "_COMPLETE.json").exists()
    try:
        assert subprocess.run(cmd, capture_output=True).returncode == 0
        out = nbformat.read(runs.OUTPUT / spec["run"] / "00_parent.ipynb", as_version=4)
        text = "".join(o.get("text", "") for c in out.cells if c.cell_type == "code" for o in c.outputs)
        assert "resuming from the checkpoint at step" in text
        assert not list((tmp_path / "run").rglob("*.tmp-*"))
        log = (tmp_path / "run" / "00_parent" / "train_log.csv").read_text().splitlines()
        assert [int(r.split(",")[0]) for r in log[1:]] == list(range(600))
    finally:
        shutil.rmtree(runs.OUTPUT / spec["run"], ignore_errors=True)


def _descendants(pid: int) -> list[int]:
    import os

    children: dict[int, list[int]] = {}
    for d in os.listdir("/proc"):
        if d.isdigit():
            try:
                stat = open(f"/proc/{d}/stat").read()
            except OSError:
                continue
            ppid = int(stat.rsplit(")", 1)[1].split()[1])
            children.setdefault(ppid, []).append(int(d))
    out, todo = [], [pid]
    while todo:
        for c in children.get(todo.pop(), []):
            out.append(c)
            todo.append(c)
    return out


@pytest.mark.parametrize("params", [{}, {"config_source": "LN-Ultra", "gpu": "H200", "num_gpus": 8, "tp": 8}])
def test_deployment_planner_notebook_runs_headless(tmp_path, params):
    import papermill as pm

    pm.execute_notebook(str(runs.NOTEBOOKS / "deployment_planner.ipynb"), str(tmp_path / "out.ipynb"),
                        parameters=params, cwd=str(runs.NOTEBOOKS), kernel_name="python3", progress_bar=False)
