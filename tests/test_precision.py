"""bf16 where it pays: the setting true / false / auto resolved per device and CPU flags."""
import pytest
import torch

from cacr.precision import cpu_flags, resolve_bf16

CPUINFO = """processor\t: 0
vendor_id\t: AuthenticAMD
flags\t\t: fpu sse2 avx avx2 avx512f avx512_bf16 fma
processor\t: 1
flags\t\t: fpu sse2 avx avx2 avx512f avx512_bf16 fma
"""


def test_cpu_flags_are_read_from_cpuinfo():
    assert {"avx2", "avx512_bf16"} <= cpu_flags(CPUINFO)
    assert cpu_flags("model name : x\n") == set()


def test_auto_uses_bf16_on_cuda_and_on_cpus_with_native_bf16_only():
    assert resolve_bf16("auto", "cuda:0") == (True, "auto: CUDA device")
    use, why = resolve_bf16("auto", "cpu", flags={"avx2", "avx512_bf16"})
    assert use and "avx512_bf16" in why
    assert resolve_bf16("auto", "cpu", flags={"avx2", "amx_bf16", "amx_tile"})[0]
    use, why = resolve_bf16("auto", "cpu", flags={"avx2", "avx512f"})  # AVX-512 without its bf16 part
    assert not use and "without AVX-512 BF16 or AMX" in why


def test_explicit_settings_win_and_bad_ones_are_named():
    assert resolve_bf16(True, "cpu", flags=set()) == (True, "set explicitly")
    assert resolve_bf16("false", "cuda") == (False, "set explicitly")
    with pytest.raises(ValueError, match="bf16 must be true, false or auto, got 'fast'"):
        resolve_bf16("fast", "cpu")


def test_the_module_scores_in_what_auto_resolves_to(monkeypatch):
    from hydra import compose, initialize_config_dir
    from hydra.utils import instantiate

    from cacr.module import RetrievalModule
    from cacr.regularizers import Regularizer

    from .conftest import REPO

    with initialize_config_dir(config_dir=str(REPO / "conf"), version_base="1.3"):
        cfg = compose("train", overrides=["model.config.hidden_size=32", "model.config.intermediate_size=64"])
    assert cfg.module.eval_bf16 == "auto"
    with torch.device("meta"):
        model = instantiate(cfg.model)
    module = RetrievalModule(model, Regularizer("none", weight=0.0), eval_bf16="auto")
    import cacr.precision as precision

    monkeypatch.setattr(precision, "cpu_flags", lambda cpuinfo=None: {"avx2"})
    assert module.eval_bf16 is False  # a CPU module, no native bf16
    monkeypatch.setattr(precision, "cpu_flags", lambda cpuinfo=None: {"avx2", "amx_bf16"})
    assert module.eval_bf16 is True


def test_auto_follows_torch_kernels_capped_below_the_hardware(monkeypatch):
    """ATEN_CPU_CAPABILITY=avx2 (an AVX2-only machine emulated on an AVX-512 one): auto keeps
    fp32 even where the flags have avx512_bf16."""
    import cacr.precision as p

    monkeypatch.setattr(p, "cpu_flags", lambda cpuinfo=None: {"avx2", "avx512f", "avx512_bf16"})
    monkeypatch.setattr(torch.backends.cpu, "get_cpu_capability", lambda: "AVX2")
    use, why = resolve_bf16("auto", "cpu")
    assert not use and "capped at AVX2" in why
    monkeypatch.setattr(torch.backends.cpu, "get_cpu_capability", lambda: "AVX512")
    assert resolve_bf16("auto", "cpu")[0]
