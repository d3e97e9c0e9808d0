"""torch._dynamo stays unimported through a whole trial, and torch's own wrappers take over once
it is imported (``samstudy.optim.lazy_dynamo``). Each case runs in a fresh Python process: this
one has imported torch._dynamo long ago."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


def _run(code: str) -> dict:
    env = {k: v for k, v in os.environ.items() if k != "SAMSTUDY_NATIVE_KERNEL"}
    done = subprocess.run(
        [sys.executable, "-c", code],
        cwd=ROOT,
        env={**env, "OMP_NUM_THREADS": "1"},
        capture_output=True,
        text=True,
        timeout=180,
    )
    assert done.returncode == 0, done.stderr[-3000:]
    return json.loads(done.stdout.strip().splitlines()[-1])


TRIAL = """
import json, sys
from samstudy.train.loop import run_trial
states, epochs = [], []
def report(metrics, state=None):
    epochs.append(metrics["epoch"])
    if state is not None:
        states.append(state)
for name in ("sgd", "sam", "saner"):
    cfg = {"data": {"name": "digits"}, "model": {"name": "mlp"}, "epochs": 2,
           "checkpoint_every": 1, "threads": 1, "device": "cpu",
           "optimizer": {"name": name, "lr": 0.05, "rho": 0.1, "momentum": 0.9,
                         **({"alpha": 0.5} if name == "saner" else {})}}
    run_trial(cfg, report)
    run_trial(cfg, report, resume=states[-2])  # resumed: load_state_dict
from samstudy.optim import native, SAM
import torch
port = SAM(torch.nn.Linear(2, 2).parameters(), torch.optim.SGD, rho=0.05, lr=0.1)
port.zero_grad(); port.load_state_dict(port.state_dict())
print(json.dumps({"dynamo": "torch._dynamo" in sys.modules, "epochs": len(epochs),
                  "native_sgd_checked": list(native._sgd_exact.values())}))
"""


def test_a_trial_with_checkpoints_and_resume_never_imports_torch_dynamo():
    """With samstudy's C SGD step (torch's own ``step`` imports torch._dynamo)."""
    from samstudy.optim import native

    if native.library() is None:
        pytest.skip("no C compiler here: the SGD steps are torch's, which import torch._dynamo")
    out = _run(TRIAL)
    assert out["epochs"] == 3 * (2 + 1)
    assert out["native_sgd_checked"] == [True]  # the C SGD's check against torch ran, too
    assert out["dynamo"] is False


COMPILED = """
import json, sys, torch
DEFER = False
if DEFER:
    from samstudy.optim.lazy_dynamo import defer_dynamo_import
    assert defer_dynamo_import() == ["add_param_group", "state_dict", "load_state_dict",
                                     "zero_grad"]
    assert defer_dynamo_import() == []  # idempotent
torch.manual_seed(0)
model = torch.nn.Linear(4, 2)
opt = torch.optim.SGD(model.parameters(), lr=0.1)
before = "torch._dynamo" in sys.modules
import torch._dynamo

def f(x):  # optimizer methods inside compiled code: torch keeps them out of the graph
    opt.zero_grad()
    lr = opt.state_dict()["param_groups"][0]["lr"]
    return model(x).sum() * lr

x = torch.randn(8, 4)
explained = torch._dynamo.explain(f)(x)
compiled = torch.compile(f, backend="eager")(x)
torch_own = []
for name in ("add_param_group", "state_dict", "load_state_dict", "zero_grad"):
    if name == "add_param_group":
        opt.add_param_group({"params": [torch.nn.Parameter(torch.zeros(1))]})
    elif name == "load_state_dict":
        opt.load_state_dict(opt.state_dict())
    else:
        getattr(opt, name)()
    cached = getattr(getattr(torch.optim.Optimizer, name).__wrapped__, "__dynamo_disable")
    torch_own.append(bool(getattr(cached, "_torchdynamo_disable", False)))
print(json.dumps({"before": before, "graphs": explained.graph_count,
                  "breaks": explained.graph_break_count, "value": compiled.item(),
                  "eager": f(x).item(), "torch_own": torch_own}))
"""


def test_once_dynamo_is_imported_compiled_code_sees_torchs_own_wrappers():
    torch_only = _run(COMPILED)
    deferred = _run(COMPILED.replace("DEFER = False", "DEFER = True"))
    assert torch_only["before"] is True  # plain torch imports it on the optimizer's creation
    assert deferred["before"] is False
    for key in ("graphs", "breaks", "value"):
        assert deferred[key] == torch_only[key], key
    assert deferred["value"] == deferred["eager"]
    assert deferred["torch_own"] == [True] * 4  # each method handed back to torch's wrapper
