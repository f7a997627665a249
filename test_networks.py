"""Tests for networks.py and losses.py at tiny sizes (ngf 4-8, 32 px, VGG with the real keys but small widths)."""
import pytest
import torch
import torch.nn as nn

import data
import losses
import networks

torch.set_num_threads(1)
WIDTHS = (4, 6, 8, 8, 8)  # a tiny VGG-19: torchvision's keys and layout, small channel counts
S = 32


def inputs(b=3, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.rand(b, 3, S, S, generator=g) * 2 - 1, torch.rand(b, 68, S, S, generator=g)


def tv_state(widths=WIDTHS, seed=0):
    """A synthetic torchvision-format VGG-19 state dict: features.N.* at the real N, plus a classifier."""
    g, state, c, block, n = torch.Generator().manual_seed(seed), {}, 3, 0, 0
    for v in networks.VGG_CFG:
        if v == "M":
            block, n = block + 1, n + 1
            continue
        state[f"features.{n}.weight"] = torch.randn(widths[block], c, 3, 3, generator=g) * 0.3
        state[f"features.{n}.bias"] = torch.randn(widths[block], generator=g) * 0.1
        c, n = widths[block], n + 2
    state["classifier.0.weight"] = torch.randn(7, 5, generator=g)
    return state


def reference_features(state, x, upto):
    """The same weights in a stack built differently (torch.nn.functional, torchvision's index rule)."""
    mean, std = (torch.tensor(v).view(1, 3, 1, 1) for v in (networks.IMAGENET_MEAN, networks.IMAGENET_STD))
    x = ((x + 1) / 2 - mean) / std
    out, n = {}, 0
    for v in networks.VGG_CFG:
        if n > upto:
            break
        if v == "M":
            x, n = torch.nn.functional.max_pool2d(x, 2), n + 1
        else:
            w, b = state[f"features.{n}.weight"], state[f"features.{n}.bias"]
            x = torch.relu(torch.nn.functional.conv2d(x, w, b, padding=1))
            out[n + 1], n = x, n + 2
    return out


def test_generator_shape_range_and_per_sample():
    G = networks.Generator(ngf=4, n_down=4)
    img, hm = inputs(3)
    y = G(img, hm)
    assert y.shape == (3, 3, S, S)
    assert y.abs().max() <= 1 and y.std() > 0
    # the training loop batches several G passes together: a sample's result must not depend on its batch
    assert torch.allclose(G(img[1:2], hm[1:2]), y[1:2], atol=1e-5)
    assert networks.Generator(ngf=4, n_down=2)(img, hm).shape == (3, 3, S, S)
    with pytest.raises(ValueError, match="n_down"):
        networks.Generator(ngf=4, n_down=5)(img, hm)  # 32 px cannot go down to 1x1


def test_generator_width_doubles_then_caps():
    G = networks.Generator(ngf=4, n_down=5)
    assert [b[0].out_channels for b in G.down] == [4, 8, 16, 32, 32]


def test_discriminator_shape_and_per_sample():
    D = networks.Discriminator(ndf=8)
    img, hm = inputs(3)
    logits = D(img, hm)
    assert logits.shape == (3,)
    assert torch.allclose(D(img[2:], hm[2:]), logits[2:], atol=1e-5)
    assert sum(isinstance(m, nn.Conv2d) and m.stride == (2, 2) for m in D.modules()) == 3


def test_count_params():
    assert networks.count_params(nn.Linear(3, 2)) == 8


def test_vgg_matches_reference_stack(tmp_path):
    state = tv_state()
    path = tmp_path / "vgg.pth"
    torch.save(state, path)
    vgg, source = networks.load_vgg(losses.VGG_LAYERS, path=str(path), widths=WIDTHS)
    assert source == str(path)
    assert len(vgg.features) == networks.RELU["relu4_3"] + 1  # stops after the deepest layer asked for
    assert not any(p.requires_grad for p in vgg.parameters()) and not vgg.training
    x = torch.rand(2, 3, S, S) * 2 - 1
    got, want = vgg(x), reference_features(state, x, networks.RELU["relu4_3"])
    assert set(got) == set(losses.VGG_LAYERS)
    for name, t in got.items():
        torch.testing.assert_close(t, want[networks.RELU[name]])
    # frozen weights, but gradients still reach the image (that is how L_pp trains G)
    x.requires_grad_(True)
    vgg(x)["relu3_2"].sum().backward()
    assert x.grad.abs().sum() > 0 and all(p.grad is None for p in vgg.parameters())


def test_vgg_bad_files_name_the_key(tmp_path):
    state = tv_state()
    path = tmp_path / "vgg.pth"
    del state["features.5.weight"]
    torch.save(state, path)
    with pytest.raises(data.DataError, match=r"vgg.pth: missing key features\.5\.weight"):
        networks.load_vgg(["relu2_2"], path=str(path), widths=WIDTHS)
    state = tv_state()
    state["features.0.weight"] = state["features.0.weight"][:2]
    torch.save(state, path)
    with pytest.raises(data.DataError, match=r"features\.0\.weight has shape \(2, 3, 3, 3\) expected \(4, 3, 3, 3\)"):
        networks.load_vgg(["relu1_1"], path=str(path), widths=WIDTHS)
    path.write_bytes(b"not a checkpoint")
    with pytest.raises(data.DataError, match="vgg.pth: cannot read"):
        networks.load_vgg(["relu1_1"], path=str(path), widths=WIDTHS)


def test_vgg_random_when_offline(tmp_path, monkeypatch):
    monkeypatch.setenv("TORCH_HOME", str(tmp_path))  # an empty hub cache
    monkeypatch.setattr(networks, "VGG_URL", "http://127.0.0.1:9/vgg19.pth")  # refused at once
    logged = []
    vgg, source = networks.load_vgg(["relu1_2"], log=logged.append, widths=WIDTHS)
    assert source == "random" and "WARNING" in logged[-1] and "RANDOM" in logged[-1]
    again, _ = networks.load_vgg(["relu1_2"], log=logged.append, widths=WIDTHS)
    torch.testing.assert_close(vgg.features[0].weight, again.features[0].weight)  # same random features each run
    # and a file in the hub cache is picked up without --vgg
    cached = tmp_path / "hub" / "checkpoints" / networks.VGG_FILE
    assert not cached.parent.exists() or not list(cached.parent.iterdir())  # no partial download left
    cached.parent.mkdir(parents=True, exist_ok=True)
    torch.save(tv_state(), cached)
    assert networks.load_vgg(["relu1_2"], widths=WIDTHS)[1] == str(cached)


def test_lambdas():
    assert losses.lambdas() == losses.LAMBDAS
    lam = losses.lambdas({"self": 0, "pix": None}, ["feature", "consistency"])
    assert lam == dict(adv=1.0, pix=10.0, self=0.0, triple=0.0, pp=0.0, id=0.0)
    with pytest.raises(ValueError, match="style"):
        losses.lambdas(ablate=["style"])
    with pytest.raises(ValueError, match="l1"):
        losses.lambdas({"l1": 1})


def test_losses_zero_when_identical_positive_otherwise():
    a, b = torch.rand(2, 3, 8, 8), torch.rand(2, 3, 8, 8)
    for L in (losses.L_pix, losses.L_self, losses.L_triple):
        assert L(a, a) == 0 and L(a, b) > 0
    fa = {k: torch.rand(2, 4, 4, 4) for k in losses.VGG_LAYERS}
    fb = {k: torch.rand(2, 4, 4, 4) for k in losses.VGG_LAYERS}
    for L in (losses.L_pp, losses.L_id):
        assert L(fa, fa) == 0 and L(fa, fb) > 0
    # GAN terms: a perfect D gives ~0, an undecided one log 2
    big = torch.full((4,), 30.0)
    assert losses.L_adv(big) < 1e-6 and losses.L_D(big, -big) < 1e-6
    assert torch.isclose(losses.L_D(torch.zeros(4), torch.zeros(4)), torch.log(torch.tensor(2.0)))
    assert torch.isfinite(losses.L_adv(torch.tensor([-1e4])))  # logits: no log(0)


def test_gram_is_per_sample():
    f = torch.rand(3, 5, 4, 4)
    g = losses.gram(f)
    assert g.shape == (3, 5, 5)
    torch.testing.assert_close(g[1], losses.gram(f[1:2])[0])
    f2 = f.clone()
    f2[0] *= 2  # changing one sample changes only its own Gram matrix
    assert torch.equal(losses.gram(f2)[1:], g[1:]) and not torch.equal(losses.gram(f2)[0], g[0])


def test_ablating_a_group_zeroes_exactly_its_gradients():
    torch.manual_seed(0)
    G, D = networks.Generator(ngf=4, n_down=2), networks.Discriminator(ndf=4)
    vgg = networks.VGG19(losses.VGG_LAYERS, widths=WIDTHS)
    img, hm = inputs(6)
    src, tgt, mid = img[:2], img[2:4], img[4:]
    e_s, e_t, e_m = hm[:2], hm[2:4], hm[4:]

    def terms():
        fake = G(src, e_t)
        cycled, middle = G(fake, e_s), G(src, e_m)
        via_middle = G(middle, e_t)
        ff, fr = vgg(fake), vgg(tgt)
        return {"adv": losses.L_adv(D(fake, e_t)), "pix": losses.L_pix(fake, tgt),
                "self": losses.L_self(cycled, src), "triple": losses.L_triple(via_middle, fake),
                "pp": losses.L_pp(ff, fr), "id": losses.L_id(ff, fr)}, cycled, middle

    def grads(loss):
        G.zero_grad()
        loss.backward()
        return [p.grad.clone() for p in G.parameters()]

    for group, dropped in losses.GROUPS.items():
        lam = losses.lambdas({}, [group])
        t, cycled, middle = terms()
        assert all(lam[k] == 0 for k in dropped) and all(torch.isfinite(v) for v in t.values())
        cycled.retain_grad(), middle.retain_grad()
        got = grads(losses.generator_loss(t, lam))
        t2, _, _ = terms()
        want = grads(sum(lam[k] * t2[k] for k in t2 if k not in dropped))
        for a, b in zip(got, want):
            torch.testing.assert_close(a, b)
        if group == "consistency":  # the cycle outputs only feed the ablated terms: no gradient at all
            assert cycled.grad is None and middle.grad is None
        full = grads(losses.generator_loss(terms()[0], losses.lambdas()))
        assert any(not torch.allclose(a, b) for a, b in zip(full, got))  # the group did contribute before


def test_feature_losses_have_finite_gradients_at_zero():
    f = {k: torch.rand(2, 4, 4, 4, requires_grad=True) for k in losses.VGG_LAYERS}
    (losses.L_pp(f, {k: v.detach() for k, v in f.items()}) + losses.L_id(f, f)).backward()
    assert all(torch.isfinite(v.grad).all() for v in f.values())
