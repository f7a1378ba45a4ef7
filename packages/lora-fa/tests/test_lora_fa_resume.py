"""Checkpoint resume: 5 steps, save, a NEW PROCESS loads and runs 5 more == 10 straight steps."""

import os
import subprocess
import sys
import textwrap

import peft
import torch

from loralab.core.testing import make_lm_batches, tiny_llama
from loralab.lora_fa import create_lorafa_optimizer

RANK, ALPHA, LR, WD = 4, 8, 5e-3, 0.01
STEPS = 10

SETUP = f"""
import peft, torch
from loralab.core.testing import make_lm_batches, tiny_llama
from loralab.lora_fa import create_lorafa_optimizer

def build(seed):
    torch.manual_seed(seed)
    config = peft.LoraConfig(r={RANK}, lora_alpha={ALPHA}, target_modules=["q_proj", "v_proj"], rank_pattern={{"v_proj": 2}})
    model = peft.get_peft_model(tiny_llama(0), config)
    model.base_model.model.model.norm.weight.requires_grad_(True)
    return model, create_lorafa_optimizer(model, {RANK}, {ALPHA}, {LR}, weight_decay={WD})

def train(model, opt, batches):
    for batch in batches:
        model(**batch).loss.backward()
        opt.step()
        opt.zero_grad()
"""

RESUME = f"""
import sys
torch.set_num_threads(1)
ckpt, out = sys.argv[1], sys.argv[2]
model, opt = build(seed=123)  # a different A draw: everything must come from the checkpoint
saved = torch.load(ckpt, weights_only=True)
model.load_state_dict(saved["model"], strict=False)
opt.load_state_dict(saved["optimizer"])
train(model, opt, make_lm_batches({STEPS}, seed=11)[{STEPS // 2}:])
torch.save({{n: p.detach() for n, p in model.named_parameters() if "lora" in n or p.requires_grad}}, out)
"""

namespace: dict = {}
exec(SETUP, namespace)  # the same build/train code in this process and in the resumed one


def test_resume_in_a_new_process_equals_straight_run(tmp_path):
    build, train = namespace["build"], namespace["train"]
    batches = make_lm_batches(STEPS, seed=11)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # same reduction order as the child process → bit-identical
    try:
        straight, opt = build(seed=0)
        train(straight, opt, batches)
        first, opt = build(seed=0)
        train(first, opt, batches[: STEPS // 2])
    finally:
        torch.set_num_threads(threads)
    adapter = {n: p.detach() for n, p in first.named_parameters() if "lora" in n or p.requires_grad}
    ckpt, out = tmp_path / "ckpt.pt", tmp_path / "resumed.pt"
    torch.save({"model": adapter, "optimizer": opt.state_dict()}, ckpt)
    script = tmp_path / "resume.py"
    script.write_text(textwrap.dedent(SETUP) + textwrap.dedent(RESUME))
    env = dict(os.environ, OMP_NUM_THREADS="1")
    proc = subprocess.run(
        [sys.executable, str(script), str(ckpt), str(out)],
        env=env,
        capture_output=True,
        text=True,
        timeout=240,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    resumed = torch.load(out, weights_only=True)
    params = dict(straight.named_parameters())
    assert any("lora_B" in n for n in resumed) and "base_model.model.model.norm.weight" in resumed
    for n, p in resumed.items():
        torch.testing.assert_close(p, params[n].detach(), rtol=0, atol=0, msg=n)


def test_state_dict_is_keyed_by_parameter_index_not_by_name():
    # PEFT's LoraFAOptimizer keys state by strings, which load_state_dict cannot map back to parameters
    # (so state stays on the device it was loaded to); ours is per parameter.
    torch.manual_seed(0)
    model = peft.get_peft_model(
        tiny_llama(0), peft.LoraConfig(r=RANK, lora_alpha=ALPHA, target_modules=["q_proj"])
    )
    opt = create_lorafa_optimizer(model, RANK, ALPHA, LR)
    model(**make_lm_batches(1)[0]).loss.backward()
    opt.step()
    sd = opt.state_dict()
    assert sorted(sd["state"]) == list(range(len(opt.param_groups[0]["params"])))
    assert set(sd["state"][0]) == {"step", "exp_avg", "exp_avg_sq"}
