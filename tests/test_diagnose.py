"""diagnose() on constructed models, and the remedies it offers, measured on small problems."""

from __future__ import annotations

import pytest
import torch
from torch import nn

import lily_lab as ll


class Holder(nn.Module):
    def __init__(self, d=4):
        super().__init__()
        self.proj = nn.Linear(d, d)
        self.proj2 = nn.Linear(d, d)

    def forward(self, x, attention_mask=None):
        return self.proj2(self.proj(x))


def model_with(E=3, r=2, routing="token", **kw):
    torch.manual_seed(0)
    return ll.add_lily(Holder(), ll.LilyConfig(r"proj2?", r=r, num_B=E, routing=routing, init_weights=False, **kw))


def recorded(model, x):
    with ll.record_routing(model) as rec:
        model(x)
    return rec.routing


def kinds(d):
    return {f.kind: f for f in d.findings}


def orthogonal_bank(model):
    site = ll.adapter_sites(model)[0]
    E, r, d = site.B.shape
    with torch.no_grad():
        site.B.zero_()
        for e in range(E):
            site.B[e, e % r, e] = 1.0
    return site


def test_identical_experts_are_critical_redundancy():
    model = model_with()
    site = ll.adapter_sites(model)[0]
    with torch.no_grad():
        site.B.copy_(site.B[0].expand_as(site.B))
    d = ll.diagnose(model)
    f = kinds(d)["redundant_experts"]
    assert f.severity == "critical" and f.sites == [site.group]
    assert f.evidence["mean_cosine"][site.group] == pytest.approx(1)
    assert "routing='token'" in f.remedy or "router_entropy_weight" in f.remedy
    assert not d.ok and "router checks skipped" in str(d)


@pytest.mark.parametrize("routing", ["token", "batch"])
def test_router_forced_to_one_expert_is_dominant_with_dead_experts(routing):
    model = model_with(E=4, routing=routing)
    site = orthogonal_bank(model)
    with torch.no_grad():
        site.A.copy_(torch.ones_like(site.A))
        site.router.copy_(torch.tensor([[50.0, 50.0], [0, 0], [0, 0], [0, 0]]))
    x = torch.rand(2, 8, 4) + 0.1
    d = ll.diagnose(model, recorded(model, x))
    k = kinds(d)
    assert site.name in k["dominant_expert"].sites and k["dominant_expert"].severity == "critical"
    assert k["dominant_expert"].evidence["top_expert"][site.name] == 0
    assert k["dead_expert"].evidence["dead_experts"][site.name] == [1, 2, 3]
    assert "balance_loss_weight" in k["dominant_expert"].remedy
    # Under batch routing a balance loss alone leaves the experts alike (notebook 03): said so.
    for kind in ("dominant_expert", "dead_expert"):
        assert ("pair it with init_weights=False or routing='token'" in k[kind].remedy) == (routing == "batch")


def test_zeroed_routers_are_input_blind():
    model = model_with()
    for s in ll.adapter_sites(model):
        with torch.no_grad():
            s.router.zero_()
    d = ll.diagnose(model, recorded(model, torch.randn(2, 8, 4)))
    f = kinds(d)["input_blind_router"]
    assert len(f.sites) == 2 and all(v == pytest.approx(0, abs=1e-9) for v in f.evidence["routing_mi"].values())
    assert "dominant_expert" not in kinds(d) and "dead_expert" not in kinds(d)


def test_fresh_adapter_is_inactive():
    torch.manual_seed(0)
    model = ll.add_lily(Holder(), ll.LilyConfig(["proj"], r=2, num_B=3))  # B = 0
    d = ll.diagnose(model)
    assert list(kinds(d)) == ["inactive_adapter"]  # and not also "redundant": zero experts mean nothing yet


def test_orthogonal_experts_with_an_input_determined_router_are_ok():
    torch.manual_seed(0)
    model = ll.add_lily(Holder(3), ll.LilyConfig(["proj"], r=3, num_B=3, routing="token", init_weights=False))
    site = ll.adapter_sites(model)[0]
    with torch.no_grad():
        site.A.copy_(torch.eye(3))
        site.router.copy_(torch.eye(3) * 3)
        site.B.zero_()
        for e in range(3):
            site.B[e, e, e] = 1.0
    x = torch.eye(3).repeat(4, 1)[None] * 2  # tokens along each axis in turn
    d = ll.diagnose(model, recorded(model, x))
    assert d.ok, str(d)
    assert d.to_frame().empty and "no collapse found" in str(d) and "No collapse" in d._repr_html_()


def test_diagnosis_renders_and_thresholds_are_configurable():
    model = model_with()
    site = ll.adapter_sites(model)[0]
    with torch.no_grad():
        site.B.copy_(site.B[0].expand_as(site.B) + 0.3 * torch.randn_like(site.B))
    cos = ll.bank_summary(model).set_index("group").loc[site.group, "mean_cosine"]
    assert ll.diagnose(model, thresholds={"redundant_cosine": cos - 0.01}).findings
    assert not any(f.kind == "redundant_experts" for f in ll.diagnose(model, thresholds={"redundant_cosine": cos + 0.01}).findings)
    with pytest.raises(ValueError, match="unknown thresholds"):
        ll.diagnose(model, thresholds={"nope": 1})
    d = ll.diagnose(model, thresholds={"redundant_cosine": 0.0})
    frame = d.to_frame()
    assert list(frame.columns[:3]) == ["kind", "severity", "summary"]
    assert "<table>" in d._repr_html_() and "redundant_experts" in str(d)


# ----------------------------------------------------------------------------- the remedies, measured


def test_balance_loss_unsticks_a_router_stuck_on_one_expert():
    """The remedy offered for dominant_expert / dead_expert."""
    results = {}
    for weight in (0.0, 0.1):
        torch.manual_seed(0)
        model = ll.add_lily(Holder(), ll.LilyConfig(["proj"], r=2, num_B=4, routing="token",
                                                    balance_loss_weight=weight, init_weights=False))
        site = ll.adapter_sites(model)[0]
        with torch.no_grad():
            site.A.fill_(0.5)
            site.router.copy_(torch.tensor([[3.0, 3.0], [0, 0], [0, 0], [0, 0]]))
        x = torch.rand(64, 1, 4) + 0.1
        opt = torch.optim.Adam([site.router], lr=0.05)
        model.train()
        for _ in range(200):
            model(x)
            loss = ll.lily_aux_loss(model)
            if loss.requires_grad:
                opt.zero_grad()
                loss.backward()
                opt.step()
        results[weight] = ll.router_metrics(recorded(model, x)).iloc[0]
    assert results[0.0].max_usage > 0.95  # nothing moves it without the loss
    assert results[0.1].max_usage < 0.5 and results[0.1].load_entropy > 0.9
    assert "dominant_expert" not in kinds(ll.diagnose(model, recorded(model, x)))  # the finding clears


def _routing_task(n=256, seed=0):
    """Inputs ±u must both map to +v: no single linear update does it, a routed one can."""
    g = torch.Generator().manual_seed(seed)
    c = torch.randint(0, 2, (n,), generator=g)
    u = torch.tensor([1.0, 0.5, -1.0, 0.0])
    x = torch.where(c[:, None] == 0, u, -u) + 0.1 * torch.randn(n, 4, generator=g)
    return x[:, None, :], torch.tensor([1.0, -1.0, 0.5, 0.0]).expand(n, 1, 4)


def _train(routing, init_weights, zero_router, steps=300):
    torch.manual_seed(0)
    model = ll.add_lily(nn.Sequential(nn.Linear(4, 4)), ll.LilyConfig(["0"], r=2, num_B=2, routing=routing,
                                                                       init_weights=init_weights))
    site = ll.adapter_sites(model)[0]
    if zero_router:
        with torch.no_grad():
            site.router.zero_()
    x, y = _routing_task()
    base = model[0].base_layer
    opt = torch.optim.Adam(site.parameters, lr=0.05)
    g = torch.Generator().manual_seed(1)
    for _ in range(steps):
        idx = torch.randint(0, len(x), (32,), generator=g)
        loss = (model(x[idx]) - base(x[idx]) - y[idx]).square().mean()
        opt.zero_grad()
        loss.backward()
        opt.step()
    with torch.no_grad():
        final = (model(x) - base(x) - y).square().mean().item()
    with ll.record_routing(model) as rec:
        model(x)
    return final, ll.router_metrics(rec.routing).iloc[0].routing_mi


def test_symmetric_start_stays_blind_and_token_routing_with_random_B_learns_to_route():
    """The remedies offered for input_blind_router: break the symmetry, and route per token."""
    stuck_loss, stuck_mi = _train("token", init_weights=True, zero_router=True)
    assert stuck_mi == pytest.approx(0, abs=1e-9)  # zero router + zero B: gradients cannot leave
    token_loss, token_mi = _train("token", init_weights=False, zero_router=True)
    batch_loss, batch_mi = _train("batch", init_weights=False, zero_router=True)
    assert token_mi > 0.5  # far above the 0.01 threshold
    assert token_loss < batch_loss / 10 and token_loss < stuck_loss / 10  # only token routing uses it
