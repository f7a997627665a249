"""The paper's six loss terms, each a scalar mean over the batch, and their weights.

    L_G = L_adv + 10 L_pix + 100 L_self + 100 L_triple + 10 L_pp + 1 L_id        L_D = BCE(real, generated)

Names follow the paper. Notation: I_s source, I_t target, e_* landmark heatmaps, I_hat = G(I_s; e_t).
Squared and absolute norms are taken as per-element means (pix2pix's convention, which the paper's
weights assume): a sum would scale every term with the image size and make the weights meaningless.
"""
import torch
import torch.nn.functional as F

TERMS = ("adv", "pix", "self", "triple", "pp", "id")
LAMBDAS = dict(adv=1.0, pix=10.0, self=100.0, triple=100.0, pp=10.0, id=1.0)
# the paper's ablation groups: -pix, -consistency (self + triple), -perceptual & identity
GROUPS = {"pix": ("pix",), "consistency": ("self", "triple"), "feature": ("pp", "id")}
PP_LAYERS = ("relu1_2", "relu2_2", "relu3_3", "relu4_3")
GRAM_LAYER = "relu3_3"
# The paper's L_id layer "relu2_3" does not exist (VGG block 2 has two convs). We use relu3_2, the
# layer the authors' own code used, so the paper's results came from it. The other candidate,
# relu2_2, is already one of L_pp's layers: L_id would then be just a tenth more weight on that
# term instead of a separate, deeper (more identity-like, less pixel-like) comparison.
ID_LAYER = "relu3_2"
VGG_LAYERS = tuple(dict.fromkeys(PP_LAYERS + (GRAM_LAYER, ID_LAYER)))  # everything the VGG must return


def lambdas(overrides=None, ablate=()):
    """Effective weights: LAMBDAS, then `overrides` (term -> weight; None = keep the default, so
    argparse defaults can be passed as they are), then every term of the `ablate` groups set to 0."""
    lam = dict(LAMBDAS)
    for k, v in (overrides or {}).items():
        if k not in lam:
            raise ValueError(f"unknown loss term '{k}'; known: {', '.join(lam)}")
        if v is not None:
            lam[k] = float(v)
    for g in ablate:
        if g not in GROUPS:
            raise ValueError(f"unknown ablation group '{g}'; known: {', '.join(GROUPS)}")
        lam.update({k: 0.0 for k in GROUPS[g]})
    return lam


def L_adv(d_fake_logits):
    # non-saturating GAN loss: -log D(I_hat, e_t); on logits, so a confident D cannot give log(0)
    return F.binary_cross_entropy_with_logits(d_fake_logits, torch.ones_like(d_fake_logits))


def L_D(d_real_logits, d_fake_logits):
    # L_D = -log D(I_t, e_t) - log(1 - D(I_hat, e_t)), halved: the BCE over real and generated together
    real = F.binary_cross_entropy_with_logits(d_real_logits, torch.ones_like(d_real_logits))
    fake = F.binary_cross_entropy_with_logits(d_fake_logits, torch.zeros_like(d_fake_logits))
    return (real + fake) / 2


def L_pix(fake, target):
    return F.mse_loss(fake, target)  # L_pix = ||G(I_s; e_t) - I_t||^2


def L_self(cycled, source):
    return F.mse_loss(cycled, source)  # L_self = ||G(G(I_s; e_t); e_s) - I_s||^2


def L_triple(via_middle, direct):
    # L_triple = ||G(G(I_s; e_m); e_t) - G(I_s; e_t)||^2: going through a third pose lands on the same image
    return F.mse_loss(via_middle, direct)


def gram(f):
    """Per-sample Gram matrix (B, C, C) / (C H W). The original code flattened the batch into it, so
    one image's style was compared with a mixture of the whole batch's."""
    b, c, h, w = f.shape
    f = f.reshape(b, c, h * w)
    return f @ f.transpose(1, 2) / (c * h * w)


def L_pp(feats_fake, feats_real):
    # L_pp = sum_l ||Phi_l(I_t) - Phi_l(I_hat)||_1  +  ||Gram(Phi_relu3_3(I_t)) - Gram(Phi_relu3_3(I_hat))||_F
    content = sum(F.l1_loss(feats_fake[l], feats_real[l]) for l in PP_LAYERS)
    style = torch.linalg.matrix_norm(gram(feats_fake[GRAM_LAYER]) - gram(feats_real[GRAM_LAYER])).mean()
    return content + style


def L_id(feats_fake, feats_real):
    # L_id = ||Phi_l(I) - Phi_l(I_hat)||_1 at ID_LAYER; a mean over the batch (the original code summed)
    return F.l1_loss(feats_fake[ID_LAYER], feats_real[ID_LAYER])


def generator_loss(terms, lam):
    """L_G = sum_k lambda_k L_k. Zero-weight terms are left out, not multiplied by 0: they may be
    missing (not computed this step), and 0 * nan would still be nan."""
    return sum(lam[k] * terms[k] for k in lam if lam[k])
