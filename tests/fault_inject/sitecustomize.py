"""Fault injection for tests/test_faults.py, in the processes those tests start.

The tests put this directory first on ``PYTHONPATH``, so Python imports this module at start-up (as
``sitecustomize``) in the launcher and in every rank.  It does nothing unless ``AVI_FAULT`` holds a JSON
list of faults ``{"rank": r, "step": s, "kind": k}`` (``s`` counts from 1, like the ``step`` of
metrics.jsonl):

* ``pause``: rank ``r`` stops right before the backward pass of step ``s``, writes
  ``{"pid", "rank", "step", "kind"}`` to ``$AVI_FAULT_DIR/<name>.json`` (``name`` defaults to
  ``<kind>-rank<r>-step<s>``) and waits there; the test then kills that pid with SIGKILL (so the kill comes
  from outside, at a known point).  A pause happens once: not when its file already exists (a rerun);
* ``pause_in_save``: the same, inside ``torch.save`` of the checkpoint of step ``s``, right after rank
  ``r`` has written its first file of it (the tag directory then holds part of the files, no COMPLETE);
* ``nan_loss`` / ``inf_loss``: rank ``r``'s loss of step ``s`` becomes NaN / +inf (the other rank's is fine);
* ``nan_input``: rank ``r``'s batch of step ``s`` is NaN, so its activations (BatchNorm statistics
  included) and its loss are;
* ``inf_grad``: rank ``r``'s loss of step ``s`` stays finite but a hook multiplies the gradient flowing
  back from it by +inf, so every gradient of that rank is non-finite before DeepSpeed reduces them.

A fault may also hold ``"when": {"optim.lr": 0.005}``: it applies only to runs whose config has those
values (e.g. one trial of a Ray Tune search, whose processes all inherit the environment).

The product code is not changed: the faults are patched into ``avi_scale.engine.trainer.Trainer`` (and
``torch.save``) by an import hook when that module is first imported.
"""

import importlib.abc
import importlib.util
import json
import os
import sys
import time

_FAULTS = json.loads(os.environ.get("AVI_FAULT", "[]") or "[]")


def _pause(fault: dict) -> None:
    """Announce this process and wait to be killed; returns at once if this fault already paused a process."""
    folder = os.environ["AVI_FAULT_DIR"]
    name = fault.get("name") or f"{fault['kind']}-rank{fault['rank']}-step{fault['step']}"
    path = os.path.join(folder, name + ".json")
    if os.path.exists(path):
        return
    tmp = os.path.join(folder, "." + name)
    with open(tmp, "w") as f:
        json.dump({**fault, "pid": os.getpid()}, f)
    os.replace(tmp, path)
    while True:
        time.sleep(3600)


def _applies(fault: dict, cfg) -> bool:
    for key, value in (fault.get("when") or {}).items():
        node = cfg
        for part in key.split("."):
            node = getattr(node, part)
        if node != value:
            return False
    return True


def _patch(loop) -> None:
    import torch

    rank = int(os.environ.get("RANK", "0"))
    mine = [f for f in _FAULTS if int(f["rank"]) == rank]
    if not mine:
        return
    real_one_step = loop.Trainer.train_step

    def one_step(self, window):
        step = self.step + 1
        now = [f for f in mine if int(f["step"]) == step and f["kind"] != "pause_in_save" and _applies(f, self.cfg)]
        if not now:
            return real_one_step(self, window)
        engine = self.engine
        real_forward, real_backward = engine.forward, engine.backward

        def forward(*args, **kwargs):
            if any(f["kind"] == "nan_input" for f in now):
                args = (args[0] * float("nan"),) + tuple(args[1:])
            out = real_forward(*args, **kwargs)
            for f in now:
                if f["kind"] in ("nan_loss", "inf_loss"):
                    out = out._replace(loss=out.loss * float("nan" if f["kind"] == "nan_loss" else "inf"))
                elif f["kind"] == "inf_grad":
                    out.loss.register_hook(lambda g: g * float("inf"))
            return out

        def backward(*args, **kwargs):
            for f in now:
                if f["kind"] == "pause":
                    _pause(f)
            return real_backward(*args, **kwargs)

        engine.forward, engine.backward = forward, backward
        try:
            return real_one_step(self, window)
        finally:
            del engine.forward, engine.backward  # back to the class's methods

    loop.Trainer.train_step = one_step

    saves = [f for f in mine if f["kind"] == "pause_in_save"]
    if saves:
        real_save = torch.save

        def save(obj, f, *args, **kwargs):
            result = real_save(obj, f, *args, **kwargs)
            if isinstance(f, (str, os.PathLike)):
                for fault in saves:
                    if f"{os.sep}step{int(fault['step']):08d}{os.sep}" in os.fspath(f):
                        _pause(fault)
            return result

        torch.save = save


class _AfterImport(importlib.abc.MetaPathFinder):
    """Patch ``avi_scale.engine.trainer`` right after it is executed."""

    target = "avi_scale.engine.trainer"

    def find_spec(self, fullname, path, target=None):
        if fullname != self.target:
            return None
        sys.meta_path.remove(self)
        try:
            spec = importlib.util.find_spec(fullname)
        finally:
            sys.meta_path.insert(0, self)
        if spec is None or spec.loader is None:
            return spec
        real_exec = spec.loader.exec_module

        def exec_module(module):
            real_exec(module)
            _patch(module)

        spec.loader.exec_module = exec_module
        return spec


if _FAULTS:
    sys.meta_path.insert(0, _AfterImport())
