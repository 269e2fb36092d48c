"""The SLURM job `side4video submit` builds: sbatch options from the `slurm` config section
(checked on the sbatch script submitit writes), and the refusals. No cluster needed."""

from __future__ import annotations

import pytest
from submitit.slurm.slurm import _make_sbatch_string

from side4video.config import load_config
from side4video.errors import UserError
from side4video.slurm import log_folder, slurm_parameters, submit_job, tasks_per_node


def sbatch_text(*overrides: str) -> str:
    cfg = load_config(None, list(overrides))
    return _make_sbatch_string(
        command="python -m submitit.core._submit FOLDER", folder="/logs", **slurm_parameters(cfg)
    )


def test_gpu_cluster_job_one_task_per_gpu():
    text = sbatch_text(
        "slurm.nodes=4",
        "slurm.gpus_per_node=8",
        "slurm.tasks_per_node=3",
        "slurm.cpus_per_task=10",
        "slurm.mem_gb=480",
        "slurm.time_minutes=1440",
        "slurm.partition=gpu",
        "slurm.account=vision",
        "slurm.qos=high",
        "slurm.constraint=a100",
        "slurm.job_name=e14",
        "slurm.signal_delay_s=300",
        "slurm.additional={exclusive: true, mail-type: END}",
        "slurm.setup=[module load cuda/12.4]",
    )
    for line in [
        "#SBATCH --nodes=4",
        "#SBATCH --ntasks-per-node=8",
        "#SBATCH --gres=gpu:8",
        "#SBATCH --cpus-per-task=10",
        "#SBATCH --mem=480GB",
        "#SBATCH --time=1440",
        "#SBATCH --partition=gpu",
        "#SBATCH --account=vision",
        "#SBATCH --qos=high",
        "#SBATCH --constraint=a100",
        "#SBATCH --job-name=e14",
        "#SBATCH --signal=USR2@300",
        "#SBATCH --requeue",
        "#SBATCH --exclusive",
        "#SBATCH --mail-type=END",
        "module load cuda/12.4",
    ]:
        assert line in text.splitlines(), line
    srun = next(line for line in text.splitlines() if line.startswith("srun "))
    assert "--kill-on-bad-exit=1" in srun and srun.endswith("python -m submitit.core._submit FOLDER")
    # the job imports this very checkout
    assert any(line.startswith("export PYTHONPATH=") for line in text.splitlines())


def test_cpu_job_uses_tasks_per_node_and_leaves_unset_options_out():
    cfg = load_config(None, ["slurm.tasks_per_node=2"])
    assert tasks_per_node(cfg) == 2
    text = sbatch_text("slurm.tasks_per_node=2")
    assert "#SBATCH --ntasks-per-node=2" in text
    for absent in ("--gres", "--mem", "--partition", "--account", "--qos", "--constraint"):
        assert absent not in text


def test_log_folder_defaults_to_the_run_directory(tmp_path):
    assert log_folder(load_config(None, [f"train.output_dir={tmp_path}"])) == tmp_path / "slurm"
    assert log_folder(load_config(None, [f"slurm.log_folder={tmp_path}/logs"])) == tmp_path / "logs"


@pytest.mark.parametrize(
    "overrides, message",
    [
        (["slurm.time_minutes=2", "slurm.signal_delay_s=120"], "slurm.signal_delay_s"),
        (["slurm.time_minutes=0"], "slurm.time_minutes"),
        (["slurm.nodes=0"], "slurm.nodes"),
    ],
)
def test_bad_slurm_settings_are_user_errors(overrides, message):
    with pytest.raises(UserError, match=message):
        slurm_parameters(load_config(None, overrides))


def test_submit_without_slurm_says_so(monkeypatch, tmp_path):
    monkeypatch.setenv("PATH", str(tmp_path))  # no srun here
    with pytest.raises(UserError, match="SLURM not found"):
        submit_job(load_config(None, [f"train.output_dir={tmp_path}"]))
    with pytest.raises(UserError, match="--command"):
        submit_job(load_config(None, [f"train.output_dir={tmp_path}"]), command="predict")
