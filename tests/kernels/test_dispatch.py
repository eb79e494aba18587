"""Which path each op takes (`ZayaConfig.kernels` and the device), what the run log says about it, and the
launch configurations read from the per-device files."""

import json
import logging
import os
import subprocess
import sys

import pytest
import torch

from zaya_train.kernels import configs, dispatch
from zaya_train.kernels.configs import device_configs, launch_config, load_device_file
from zaya_train.model import ZayaConfig, ZayaForCausalLM, preset

CPU = torch.device("cpu")
CUDA = torch.device("cuda", 0)
OPS = ("rms_norm", "residual_rms_norm", "linear_cross_entropy", "token_logprobs", "moe_experts", "cca_conv_qk")

TORCH_AND_AUTO_ON_CPU = """
import io, json, logging, sys
import torch
from zaya_train.model import ZayaForCausalLM, preset

stream = io.StringIO()
logger = logging.getLogger("zaya_train")
logger.addHandler(logging.StreamHandler(stream))
logger.setLevel(logging.INFO)
ids = torch.randint(3, 64, (2, 8))
imported = {}
for mode in ("torch", "auto"):
    model = ZayaForCausalLM(preset("nano", num_hidden_layers=1, kernels=mode))
    for _ in range(2):  # a second step logs nothing new
        model(ids, labels=ids, return_logits=False).loss.backward()
        out = model(ids, labels=ids, return_logits=False, return_logprobs=True, logprob_temperature=0.7)
        out.logprobs.sum().backward()
    imported[mode] = "triton" in sys.modules
print(json.dumps({"imported": imported, "log": stream.getvalue().splitlines()}))
"""


@pytest.fixture
def fresh_decisions(monkeypatch):
    """Decisions and their log lines as in a new process."""
    monkeypatch.setattr(dispatch, "_logged", set())
    dispatch._decide.cache_clear()
    yield
    dispatch._decide.cache_clear()


def test_torch_and_auto_on_a_cpu_never_touch_triton():
    """In a fresh process with the interpreter available (TRITON_INTERPRET=1): `torch` and `auto` take the
    PyTorch path for every op, never import Triton, and the log names each op's path once."""
    env = {**os.environ, "TRITON_INTERPRET": "1"}
    proc = subprocess.run([sys.executable, "-c", TORCH_AND_AUTO_ON_CPU], env=env, capture_output=True,
                          text=True, timeout=600, check=False)
    assert proc.returncode == 0, proc.stderr[-3000:]
    result = json.loads(proc.stdout.splitlines()[-1])
    assert result["imported"] == {"torch": False, "auto": False}
    auto = "cpu tensors (auto never uses the Triton interpreter); kernels=auto"
    expected = [f"kernels: {op} takes the torch path (kernels=torch)" for op in OPS]
    expected += [f"kernels: {op} takes the torch path ({auto})" for op in OPS]
    assert sorted(result["log"]) == sorted(expected)


def test_triton_on_a_cpu_uses_the_interpreter_only_when_it_is_on(monkeypatch, caplog, fresh_decisions):
    caplog.set_level(logging.INFO, logger="zaya_train")
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    assert dispatch.use_triton("rms_norm", "triton", CPU)
    assert "rms_norm takes the triton path (cpu tensors through the Triton interpreter" in caplog.text
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    caplog.clear()
    assert not dispatch.use_triton("rms_norm", "triton", CPU)
    [record] = caplog.records
    assert record.levelno == logging.WARNING and "set TRITON_INTERPRET=1" in record.getMessage()


def test_gpu_decisions(monkeypatch, caplog, fresh_decisions):
    """On a GPU (faked: only the device's name is asked for), auto and triton take Triton, naming the device
    and its config file; torch does not; without an importable Triton, auto falls back quietly, triton
    with a warning."""
    caplog.set_level(logging.INFO, logger="zaya_train")
    monkeypatch.setattr(configs, "device_name", lambda device: "AMD Instinct MI300X")
    assert dispatch.use_triton("linear_cross_entropy", "auto", CUDA)
    assert dispatch.use_triton("linear_cross_entropy", "triton", CUDA)
    assert not dispatch.use_triton("linear_cross_entropy", "torch", CUDA)
    assert "linear_cross_entropy takes the triton path (cuda device 'AMD Instinct MI300X', configs mi300x; " \
           "kernels=auto)" in caplog.text
    dispatch._decide.cache_clear()
    monkeypatch.setattr(dispatch, "triton_importable", lambda: False)
    caplog.clear()
    assert not dispatch.use_triton("rms_norm", "auto", CUDA)
    assert not dispatch.use_triton("rms_norm", "triton", CUDA)
    assert [r.levelno for r in caplog.records] == [logging.INFO, logging.WARNING]
    assert "Triton does not import on this machine" in caplog.text


def test_modes_are_checked():
    with pytest.raises(ValueError, match="ZayaConfig.kernels must be one of"):
        ZayaConfig(kernels="fast")
    with pytest.raises(ValueError, match="kernels must be one of"):
        dispatch.use_triton("rms_norm", "fast", CPU)
    model = ZayaForCausalLM(preset("nano", num_hidden_layers=1))
    assert model.config.kernels == "auto"
    with pytest.raises(ValueError, match="ZayaConfig.kernels"):
        model.set_kernels("fast")
    model.set_kernels("torch")
    assert model.config.kernels == model.lm_head.kernels == model.model.norm.kernels == "torch"
    assert model.model.layers[0].mlp.gate.router_mlp.norm.kernels == "torch"


def test_kernels_is_not_part_of_the_hf_config():
    """A training-only field: never written to an HF config.json, ignored if one carries it."""
    config = preset("nano", kernels="torch")
    hf = config.to_hf_dict()
    assert "kernels" not in hf
    assert ZayaConfig.from_hf_dict({**hf, "kernels": "triton"}).kernels == "auto"


def test_device_files_are_found_by_device_name():
    assert device_configs("AMD Instinct MI300X").name == "mi300x"
    assert device_configs("AMD Instinct MI325X").name == "mi300x"
    assert device_configs("NVIDIA H100 80GB HBM3").name == "h100"
    assert device_configs("NVIDIA H200").name == "h100"
    assert device_configs("NVIDIA A100-SXM4-80GB").name == "defaults"
    for path in sorted(configs.CONFIG_DIR.glob("*.json")):
        load_device_file(path)  # every shipped file is well formed


@pytest.fixture
def fake_mi300x(monkeypatch):
    """`cuda` tensors live on an MI300X, as far as launch configs can tell; no cached config outlives it."""
    def name(device: torch.device) -> str:
        return "AMD Instinct MI300X" if device.type == "cuda" else device.type

    monkeypatch.setattr(configs, "device_name", name)
    configs._launch_config.cache_clear()
    yield
    configs._launch_config.cache_clear()


@pytest.mark.usefixtures("fake_mi300x")
def test_launch_config_by_size_with_overrides_last():
    cfg = launch_config("rms_norm_bwd", 2048, CUDA)
    assert cfg.source == "mi300x"
    assert cfg.meta == {"BLOCK_N": 2} and cfg.host == {"programs_per_sm": 2}
    assert cfg.options == {"num_warps": 16, "waves_per_eu": 0}
    assert launch_config("rms_norm_bwd", 1024, CUDA).meta == {"BLOCK_N": 2}  # the smallest key >= the size
    assert launch_config("rms_norm_bwd", 10**6, CUDA).options["num_warps"] == 32  # past the last: the last
    assert launch_config("softmax_ce", 262272, CUDA).meta == {"BLOCK_V": 4096}
    assert launch_config("lm_head", 262272, CUDA).host == {"chunk_tokens": 4096}
    assert launch_config("rms_norm_fwd", 2048, CUDA, {"BLOCK_N": 8}).meta == {"BLOCK_N": 8}
    # On the CPU (the interpreter): the defaults, and no backend-specific compiler options.
    cpu = launch_config("rms_norm_fwd", 2048, CPU)
    assert cpu.source == "defaults" and set(cpu.options) <= {"num_warps", "num_stages"}


@pytest.mark.parametrize("bad, message", [
    ({"kernels": {"rms_norm_fwd": {"2048": {"waves_per_eu": 2}}}}, "unknown key 'waves_per_eu'"),
    ({"kernels": {"rms_norm_fwd": {"2048": {"BLOCK_N": "4"}}}}, "BLOCK_N must be a non-negative integer"),
    ({"kernels": {"layer_norm": {}}}, "unknown kernel 'layer_norm'"),
    ({"kernels": {"rms_norm_fwd": {"big": {}}}}, "size keys are integers"),
    ({"autotune": True}, "unknown top-level keys"),
])
def test_a_malformed_device_file_fails_naming_the_key(tmp_path, bad, message):
    path = tmp_path / "gpu.json"
    path.write_text(json.dumps({"devices": ["H100"], "backend": "cuda", "arch": "sm_90", **bad}))
    with pytest.raises(ValueError, match=message):
        load_device_file(path)
