"""A model's full state (tensors, buffers, module classes, attributes, hooks), to check that a refused
call changed nothing."""

import torch


def fingerprint(model):
    tensors = {k: v.detach().clone() for k, v in model.state_dict().items()}
    tensors.update({f"buffer:{k}": v.detach().clone() for k, v in model.named_buffers()})
    structure = {
        name: (type(m), tuple(m._buffers), tuple(sorted(vars(m))), len(m._forward_hooks), len(m._forward_pre_hooks))
        for name, m in model.named_modules()
    }
    return tensors, structure


def assert_unchanged(model, before):
    tensors, structure = fingerprint(model)
    assert structure == before[1]
    assert tensors.keys() == before[0].keys()
    for k, v in tensors.items():
        assert type(v) is type(before[0][k]) and torch.equal(v, before[0][k]), k
