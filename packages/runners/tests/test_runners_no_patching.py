"""Importing loralab changes nothing in PEFT, transformers or torch.nn.

Every loralab module installed (all method packages, core and the runners) is imported in a fresh
interpreter, between two snapshots of ``vars()`` of every class and module of ``peft.tuners.lora``
(LoraLayer, Linear, Embedding, the bitsandbytes layers, LoraModel, LoraConfig, the variants,
LoRA-GA's ``preprocess_loraga`` ...), PEFT's model / tuner / mapping modules, transformers'
``PreTrainedModel`` and the torch layer classes. Each entry must be the very same object before and
after, and no entry may appear or disappear — after the imports, and again after loralab's
PEFT-facing code ran (LoRA-GA's native API, seed context and PEFT drop-in; LoRA-FA's layers).
"""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

SNAPSHOT_SCRIPT = r"""
import importlib, inspect, json, pkgutil, sys, warnings

warnings.simplefilter("ignore")
import peft, peft.tuners.lora, torch, transformers

# PEFT's own lazily imported modules first, so importing them later is not mistaken for a change
PEFT_MODULES = sorted(
    m.name for m in pkgutil.walk_packages(peft.tuners.lora.__path__, "peft.tuners.lora.")
) + ["peft.tuners.lora", "peft.peft_model", "peft.tuners.tuners_utils", "peft.mapping_func",
     "peft.mapping", "peft.config", "peft.utils.other", "peft.utils.save_and_load"]
modules = {}
for name in PEFT_MODULES:
    try:
        modules[name] = importlib.import_module(name)
    except ImportError:  # an optional backend PEFT supports but this environment lacks
        pass
classes = {}
for mod_name, mod in modules.items():
    for attr, obj in vars(mod).items():
        if inspect.isclass(obj) and obj.__module__.startswith("peft."):
            classes[f"{obj.__module__}.{obj.__qualname__}"] = obj
for cls in (transformers.PreTrainedModel, torch.nn.Module, torch.nn.Linear, torch.nn.Embedding,
            torch.nn.Dropout, torch.nn.ModuleDict):
    classes[f"{cls.__module__}.{cls.__qualname__}"] = cls

# transformers adds nn.Module.smart_apply the first time it builds a model: do that before the snapshot
transformers.LlamaForCausalLM(
    transformers.LlamaConfig(
        vocab_size=32, hidden_size=16, intermediate_size=32, num_hidden_layers=1,
        num_attention_heads=2, num_key_value_heads=2,
    )
)


def snapshot():
    out = {}
    for name, mod in modules.items():
        out["module " + name] = dict(vars(mod))
    for name, cls in classes.items():
        out["class " + name] = dict(vars(cls))
    return out


before = snapshot()
imported = []
import loralab
for info in sorted(pkgutil.walk_packages(loralab.__path__, "loralab."), key=lambda m: m.name):
    if info.name.endswith("__main__"):
        continue
    importlib.import_module(info.name)
    imported.append(info.name)


def diff(before, after):
    changes = []
    for key, old in before.items():
        new = after[key]
        for attr in sorted(set(old) | set(new)):
            if attr not in new:
                changes.append(f"{key}: {attr} removed")
            elif attr not in old:
                changes.append(f"{key}: {attr} added")
            elif new[attr] is not old[attr]:
                changes.append(f"{key}: {attr} replaced")
    return changes


changes = diff(before, snapshot())
# and while loralab's PEFT-facing code runs: LoRA-GA native, seed context, PEFT drop-in, LoRA-FA
from loralab.core.testing import make_lm_batches, tiny_llama
from loralab import lora_fa, lora_ga

batches = make_lm_batches(1)
cfg = lambda: lora_ga.LoraGAConfig(r=2, target_modules=["q_proj"], iters=1)
lora_ga.get_lora_ga_model(tiny_llama(), cfg(), batches, progress=False)
model = tiny_llama()
grads = lora_ga.estimate_gradient(model, batches, None, targets=["q_proj"], progress=False)
with lora_ga.LoraGAContext(model, grads):
    peft.get_peft_model(model, cfg())
model = tiny_llama()
config = peft.LoraConfig(r=2, target_modules=["q_proj"], init_lora_weights="lora_ga",
                         lora_ga_config=peft.LoraGAConfig(), lora_dropout=0.1)
lora_ga.preprocess_loraga(model, config, lambda: model(**batches[0]).loss.backward())
pm = peft.get_peft_model(model, config)
lora_fa.apply_lorafa_layers(pm)
pm.train()
pm(**batches[0]).loss.backward()
lora_fa.remove_lorafa_layers(pm)
used = diff(before, snapshot())
print(json.dumps({"imported": imported, "classes": sorted(classes), "changes": changes,
                  "changes_after_use": used}))
"""


@pytest.mark.slow
def test_importing_and_using_loralab_leaves_peft_and_transformers_unchanged():
    proc = subprocess.run(
        [sys.executable, "-c", SNAPSHOT_SCRIPT],
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    result = json.loads(proc.stdout.strip().splitlines()[-1])
    imported = set(result["imported"])
    # every package of the workspace was imported, with the modules that used to patch PEFT
    for name in (
        "loralab.core",
        "loralab.lora_ga",
        "loralab.lora_ga.layer",
        "loralab.lora_ga.model",
        "loralab.lora_ga.seed",
        "loralab.lora_fa",
        "loralab.lora_fa.layer",
        "loralab.lora_sb",
        "loralab.lora_pro",
        "loralab.golore",
        "loralab.runners",
    ):
        assert name in imported, name
    classes = set(result["classes"])
    for name in (
        "peft.tuners.lora.layer.LoraLayer",
        "peft.tuners.lora.layer.Linear",
        "peft.tuners.lora.layer.Embedding",
        "peft.tuners.lora.model.LoraModel",
        "peft.tuners.lora.config.LoraConfig",
        "peft.tuners.lora.config.LoraGAConfig",
        "peft.tuners.lora.bnb.Linear4bit",
        "peft.peft_model.PeftModel",
        "transformers.modeling_utils.PreTrainedModel",
    ):
        assert name in classes, name
    assert result["changes"] == []
    assert result["changes_after_use"] == []
