"""A deliberately naive TarFlow written straight from the key table, for checking tarflow/.

It shares no code with tarflow/: attention is an explicit per-head softmax, the
block inverse recomputes the whole causal forward for every token (no KV cache),
and guidance runs the conditional and unconditional passes separately, as the
apple/ml-tarflow sampler does."""
import math

import torch
import torch.nn.functional as F


def key_table(T, D, C, num_blocks, layers, num_classes):
    """Every key and shape of an apple/ml-tarflow state dict."""
    shapes = {"var": (T, D)}
    for i in range(num_blocks):
        p = f"blocks.{i}."
        shapes[p + "pos_embed"] = (T, C)
        if num_classes:
            shapes[p + "class_embed"] = (num_classes, 1, C)
        shapes[p + "attn_mask"] = (T, T)
        shapes[p + "proj_in.weight"], shapes[p + "proj_in.bias"] = (C, D), (C,)
        for j in range(layers):
            q = f"{p}attn_blocks.{j}."
            shapes[q + "attention.norm.weight"] = shapes[q + "attention.norm.bias"] = (C,)
            shapes[q + "attention.qkv.weight"], shapes[q + "attention.qkv.bias"] = (3 * C, C), (3 * C,)
            shapes[q + "attention.proj.weight"], shapes[q + "attention.proj.bias"] = (C, C), (C,)
            shapes[q + "mlp.norm.weight"] = shapes[q + "mlp.norm.bias"] = (C,)
            shapes[q + "mlp.main.0.weight"], shapes[q + "mlp.main.0.bias"] = (4 * C, C), (4 * C,)
            shapes[q + "mlp.main.2.weight"], shapes[q + "mlp.main.2.bias"] = (C, 4 * C), (C,)
        shapes[p + "proj_out.weight"], shapes[p + "proj_out.bias"] = (2 * D, C), (2 * D,)
    return shapes


def random_state_dict(T, D, C, num_blocks, layers, num_classes, seed=0):
    g = torch.Generator().manual_seed(seed)
    sd = {}
    for k, shape in key_table(T, D, C, num_blocks, layers, num_classes).items():
        if k.endswith("attn_mask"):
            sd[k] = torch.tril(torch.ones(T, T))
        elif k == "var":
            sd[k] = 0.5 + torch.rand(shape, generator=g)
        elif k.endswith("norm.weight"):
            sd[k] = 1 + 0.1 * torch.randn(shape, generator=g)
        elif "proj_out" in k:
            sd[k] = 0.02 * torch.randn(shape, generator=g)
        else:
            sd[k] = torch.randn(shape, generator=g) / math.sqrt(shape[-1])
    return sd


def _layer_norm(x, sd, p):
    return F.layer_norm(x, x.shape[-1:], sd[p + "weight"], sd[p + "bias"], eps=1e-5)


def _attention(x, sd, p, head_dim, temp):
    B, T, C = x.shape
    H = C // head_dim
    h = _layer_norm(x, sd, p + "norm.")
    qkv = h @ sd[p + "qkv.weight"].T + sd[p + "qkv.bias"]
    heads = []
    for n in range(H):
        q = qkv[..., n * head_dim : (n + 1) * head_dim]
        k = qkv[..., C + n * head_dim : C + (n + 1) * head_dim]
        v = qkv[..., 2 * C + n * head_dim : 2 * C + (n + 1) * head_dim]
        logits = q @ k.transpose(1, 2) / math.sqrt(head_dim) / temp
        logits = logits.masked_fill(torch.ones(T, T).triu(1).bool(), float("-inf"))
        heads.append(logits.softmax(-1) @ v)
    return torch.cat(heads, -1) @ sd[p + "proj.weight"].T + sd[p + "proj.bias"]


def block_params(sd, i, xp, y, layers, head_dim, flip, temp=1.0):
    """Shifted (a, b) of block i for permuted tokens xp; y None -> mean class embedding."""
    p = f"blocks.{i}."
    pos = sd[p + "pos_embed"].flip(0) if flip else sd[p + "pos_embed"]
    h = xp @ sd[p + "proj_in.weight"].T + sd[p + "proj_in.bias"] + pos
    if p + "class_embed" in sd:
        ce = sd[p + "class_embed"]
        h = h + (ce.mean(0) if y is None else ce[y])
    for j in range(layers):
        q = f"{p}attn_blocks.{j}."
        h = h + _attention(h, sd, q + "attention.", head_dim, temp)
        m = _layer_norm(h, sd, q + "mlp.norm.")
        h = h + F.linear(F.gelu(F.linear(m, sd[q + "mlp.main.0.weight"], sd[q + "mlp.main.0.bias"])),
                         sd[q + "mlp.main.2.weight"], sd[q + "mlp.main.2.bias"])
    out = h @ sd[p + "proj_out.weight"].T + sd[p + "proj_out.bias"]
    out = torch.cat([torch.zeros_like(out[:, :1]), out[:, :-1]], 1)
    return out.chunk(2, -1)


def encode(sd, x_tokens, y, num_blocks, layers, head_dim):
    logdet = 0
    x = x_tokens
    for i in range(num_blocks):
        flip = i % 2 == 1
        xp = x.flip(1) if flip else x
        a, b = block_params(sd, i, xp, y, layers, head_dim, flip)
        z = (xp - b) * torch.exp(-a)
        x = z.flip(1) if flip else z
        logdet = logdet - a.mean(dim=[1, 2])
    return x, logdet


@torch.no_grad()
def sample(sd, noise, y, num_blocks, layers, head_dim, guidance=0.0, attn_temp=1.0, annealed=False, what="ab"):
    """Token-by-token inversion, recomputing the full forward at every step."""
    x = noise * sd["var"].sqrt()
    T = x.shape[1]
    for i in reversed(range(num_blocks)):
        flip = i % 2 == 1
        z = x.flip(1) if flip else x
        xp = z.clone()
        for t in range(1, T):
            a, b = block_params(sd, i, xp, y, layers, head_dim, flip)
            a, b = a[:, t], b[:, t]
            if guidance > 0:
                au, bu = block_params(sd, i, xp, None, layers, head_dim, flip, attn_temp)
                au, bu = au[:, t], bu[:, t]
                g = t / (T - 1) * guidance if annealed else guidance
                if "a" in what:
                    a = a + g * (a - au)
                if "b" in what:
                    b = b + g * (b - bu)
            xp[:, t] = z[:, t] * torch.exp(a) + b
        x = xp.flip(1) if flip else xp
    return x
