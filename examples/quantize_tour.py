"""Quantize a tensor to NVFP4 and MXFP4 and report the error of each variant."""

import torch

import fp4compile


def main() -> None:
    torch.manual_seed(0)
    x = torch.randn(1024, 768) * torch.logspace(-2, 2, 768)
    variants = {
        "nvfp4 1x16 nearest": dict(format="nvfp4"),
        "nvfp4 16x16 nearest": dict(format="nvfp4", block=(16, 16)),
        "nvfp4 1x16 stochastic": dict(format="nvfp4", rounding="stochastic", seed=0),
        "mxfp4 1x32 nearest": dict(format="mxfp4"),
    }
    print(f"{'variant':28s} {'rel. error':>10s} {'SQNR dB':>8s}")
    for name, kwargs in variants.items():
        x_hat = fp4compile.quantize_dequantize(x, **kwargs)
        err = (x_hat - x).norm() / x.norm()
        print(f"{name:28s} {err.item():10.4f} {-20 * torch.log10(err).item():8.2f}")


if __name__ == "__main__":
    main()
