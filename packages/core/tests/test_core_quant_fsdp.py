"""bitsandbytes 4-bit layers under FSDP2 (``fully_shard``), in one process (a one-rank gloo group).

FSDP2 turns a ``Linear4bit``'s packed codes into a ``DTensor`` and keeps the statistics on the layer:
core reads and writes such a layer (dequantize, re-quantize with the layer's own settings) exactly as
the plain one, and :func:`check_fsdp_quantized` refuses what FSDP2 would break, before the first
forward. The two-rank version runs in the LoRA-GA / LoRA-SB FSDP-QLoRA tests.
"""

import copy
import logging

import pytest
import torch
import torch.distributed as dist
from torch import nn

from loralab.core.quant import (
    QuantizationError,
    check_fsdp_quantized,
    dequantize_weight,
    quant_config_of,
    requantize_weight_,
)
from loralab.core.sharding import is_dtensor

bnb = pytest.importorskip("bitsandbytes")
logging.getLogger("bitsandbytes").setLevel(logging.ERROR)

IN, OUT = 128, 48
STORAGES = [torch.uint8, torch.bfloat16, torch.float32]


@pytest.fixture
def one_rank_group(tmp_path):
    if dist.is_initialized():
        pytest.skip("a process group is already up in this process")
    dist.init_process_group(
        "gloo", init_method=f"file://{tmp_path / 'store'}", rank=0, world_size=1
    )
    try:
        yield
    finally:
        dist.destroy_process_group()


def _net(storage: torch.dtype, *, quantize: bool = True) -> nn.Sequential:
    torch.manual_seed(0)
    lin = nn.Linear(IN, OUT)
    layer = bnb.nn.Linear4bit(
        IN, OUT, compute_dtype=torch.float32, quant_type="nf4", quant_storage=storage
    )
    layer.weight = bnb.nn.Params4bit(
        lin.weight.data.clone(),
        requires_grad=False,
        quant_type="nf4",
        blocksize=64,
        compress_statistics=True,
        quant_storage=storage,
        module=layer,
    )
    layer.bias = nn.Parameter(lin.bias.data.clone(), requires_grad=False)
    net = nn.Sequential(layer, nn.Linear(OUT, 8))
    return net.to("cpu") if quantize else net  # Params4bit quantizes on its first move


def _shard(net: nn.Module, param_dtype: torch.dtype | None = None) -> nn.Module:
    from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard

    return fully_shard(net, mp_policy=MixedPrecisionPolicy(param_dtype=param_dtype))


@pytest.mark.parametrize("storage", STORAGES)
def test_sharded_4bit_reads_writes_and_runs_as_the_plain_layer(one_rank_group, storage):
    plain = _net(storage)
    sharded = _shard(copy.deepcopy(plain))
    assert check_fsdp_quantized(sharded) == 1
    layer = sharded[0]
    assert is_dtensor(layer.weight) and getattr(layer.weight, "quant_state", None) is None
    assert layer.support_avx512bf16_for_cpu is False  # the CPU repacking is off on sharded layers
    # the same settings and the same dequantized weight as the layer before sharding
    assert quant_config_of(layer) == quant_config_of(plain[0])
    assert quant_config_of(layer).quant_storage == storage
    w = dequantize_weight(plain[0])
    assert torch.equal(dequantize_weight(layer), w)
    x = torch.randn(3, IN, generator=torch.Generator().manual_seed(1))
    torch.testing.assert_close(sharded(x), plain(x), rtol=0, atol=1e-6)
    # re-quantizing writes the codes into the shard and the statistics on the layer: the parameter
    # stays the DTensor FSDP2 manages, and the result equals the plain layer's re-quantization
    sharded.reshard()  # a root module stays gathered after an inference forward
    new = w - 0.1 * torch.ones_like(w)
    requantize_weight_(plain[0], new)
    requantize_weight_(layer, new)
    assert is_dtensor(layer.weight)
    assert quant_config_of(layer) == quant_config_of(plain[0])
    assert torch.equal(dequantize_weight(layer), dequantize_weight(plain[0]))
    torch.testing.assert_close(sharded(x), plain(x), rtol=0, atol=1e-6)


@pytest.mark.parametrize("storage", STORAGES)
def test_mixed_precision_cast_of_float_storage_is_refused(one_rank_group, storage):
    sharded = _shard(_net(storage), param_dtype=torch.bfloat16)
    if storage is torch.float32:  # FSDP2 would cast the packed codes to bfloat16
        with pytest.raises(QuantizationError) as e:
            check_fsdp_quantized(sharded)
        msg = str(e.value)
        assert msg.startswith("0 (Linear4bit) stores its 4-bit codes as torch.float32")
        assert "MixedPrecisionPolicy(param_dtype=torch.bfloat16)" in msg
        assert "BitsAndBytesConfig(bnb_4bit_quant_storage=torch.bfloat16)" in msg
    else:  # integer codes are never cast; bfloat16 codes are not cast to bfloat16
        assert check_fsdp_quantized(sharded) == 1
        sharded(torch.randn(2, IN, dtype=torch.bfloat16))


def test_layer_sharded_before_quantization_is_refused(one_rank_group):
    sharded = _shard(_net(torch.float32, quantize=False))
    with pytest.raises(QuantizationError, match=r"^0 \(Linear4bit\) was sharded by FSDP2 before"):
        check_fsdp_quantized(sharded)


def test_int8_layer_under_fsdp2_is_refused(one_rank_group):
    torch.manual_seed(0)
    lin = nn.Linear(IN, OUT)
    layer = bnb.nn.Linear8bitLt(IN, OUT, has_fp16_weights=False)
    layer.load_state_dict(lin.state_dict())
    sharded = _shard(nn.Sequential(layer.to("cpu")))
    with pytest.raises(QuantizationError, match=r"^0 is a bitsandbytes int8 Linear8bitLt sharded"):
        check_fsdp_quantized(sharded)


def test_plain_models_have_nothing_to_check(one_rank_group):
    assert check_fsdp_quantized(_net(torch.uint8)) == 0  # quantized, not sharded
    assert check_fsdp_quantized(_shard(nn.Sequential(nn.Linear(4, 4)))) == 0  # sharded, float


@pytest.mark.parametrize("storage", STORAGES)
def test_fsdp_storage_check_before_sharding(storage, monkeypatch):
    """Integer code storage is refused before ``fully_shard`` where this torch's FSDP2 cannot shard
    it (torch < 2.13 builds integer sharded parameters with requires_grad=True and fails; seen on 2.11
    with CUDA); float storage, and every storage on a torch that can, pass."""
    import loralab.core.quant.fsdp as quant_fsdp

    net = _net(storage)
    assert quant_fsdp.check_fsdp_storage(net) == 1  # this torch (2.13) shards every storage
    monkeypatch.setattr(quant_fsdp, "fsdp2_shards_integer_storage", lambda: False)
    if storage.is_floating_point:
        assert quant_fsdp.check_fsdp_storage(net) == 1
    else:
        with pytest.raises(
            QuantizationError,
            match=r"0 \(Linear4bit\) stores its 4-bit codes as torch.uint8.*bnb_4bit_quant_storage=torch.bfloat16",
        ):
            quant_fsdp.check_fsdp_storage(net)


def test_cpu_repacking_off_sets_and_restores_the_flag():
    """Inside the block no 4-bit layer repacks (bitsandbytes' flag off), after it each layer has its
    own value back. On a CPU with AVX512-BF16 the estimates' own no-grad passes repacked layers and
    cut their targets' gradients (the adapter-gradient tests failed there without it)."""
    from loralab.core.quant import cpu_repacking_off

    net = nn.Sequential(_net(torch.uint8), _net(torch.bfloat16))
    layers = [m for m in net.modules() if hasattr(m, "support_avx512bf16_for_cpu")]
    assert len(layers) == 2
    layers[0].support_avx512bf16_for_cpu, layers[1].support_avx512bf16_for_cpu = True, False
    with cpu_repacking_off(net) as n:
        assert n == 2 and not any(m.support_avx512bf16_for_cpu for m in layers)
    assert [m.support_avx512bf16_for_cpu for m in layers] == [True, False]
