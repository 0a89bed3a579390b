import torch

import curvlab


def test_adafisher_trains_mlp_one_step():
    model = torch.nn.Sequential(torch.nn.Linear(4, 8), torch.nn.ReLU(), torch.nn.Linear(8, 3))
    opt = curvlab.AdaFisher(model, lr=1e-2)
    before = [p.detach().clone() for p in model.parameters()]
    x, y = torch.randn(16, 4), torch.randint(0, 3, (16,))
    torch.nn.functional.cross_entropy(model(x), y).backward()
    opt.step()
    assert all(not torch.equal(b, p) for b, p in zip(before, model.parameters()))
    F = opt.preconditioner(model[0].weight)
    assert F.shape == model[0].weight.shape and bool((F >= 1e-3).all())
