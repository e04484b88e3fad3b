import torch
from torch import nn

from harpq.io.model import find_decoder_layers, layer_linears, load_model
from harpq.pipeline.hessian import HessianCollector


class TwoBranch(nn.Module):
    def __init__(self):
        super().__init__()
        self.a = nn.Linear(16, 8, bias=False)
        self.b = nn.Linear(16, 8, bias=False)
        self.c = nn.Linear(8, 4, bias=False)

    def forward(self, x):
        return self.c(self.a(x) + self.b(x))


def test_shared_inputs_share_one_hessian_equal_to_mean_xxT():
    torch.manual_seed(0)
    m = TwoBranch()
    col = HessianCollector(dict(m.named_children()))
    xs = [torch.randn(3, 5, 16) for _ in range(4)]
    for x in xs:
        m(x)
        col.end_pass()
    col.remove()
    assert col.group_of == {"a": "a", "b": "a", "c": "c"}
    flat = torch.cat([x.reshape(-1, 16) for x in xs]).double()
    assert torch.allclose(col.hessian("b"), flat.T @ flat / flat.shape[0], atol=1e-12)
    hidden = torch.cat([(m.a(x) + m.b(x)).reshape(-1, 8) for x in xs]).double()
    assert torch.allclose(col.hessian("c"), hidden.T @ hidden / hidden.shape[0], atol=1e-6)


def test_llama_groups_qkv_and_gate_up(tiny_path):
    model = load_model(tiny_path, dtype=torch.float32)
    _, layers = find_decoder_layers(model)
    linears = layer_linears(layers[0])
    col = HessianCollector(linears)
    captured = {}
    handle = layers[0].register_forward_pre_hook(lambda mod, a, k: captured.update(k), with_kwargs=True)
    with torch.no_grad():
        model(torch.randint(0, 8192, (1, 32)), use_cache=False)
    handle.remove()
    col.remove()
    groups = {}
    for name, leader in col.group_of.items():
        groups.setdefault(leader, []).append(name.rsplit(".", 1)[-1])
    assert sorted(map(sorted, groups.values())) == [["down_proj"], ["gate_proj", "up_proj"],
                                                     ["k_proj", "q_proj", "v_proj"], ["o_proj"]]
