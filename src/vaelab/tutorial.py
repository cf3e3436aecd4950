"""The course tutorial's VAE as its code writes it, for ``vaelab.bench``'s reference loop: an MLP
784-512-2 with two separate heads for mu and log sigma^2, noise drawn on the CPU and moved to the
model's device, and the KL term kept on the encoder (averaged over the batch)."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from vaelab.model import VAE

TUTORIAL_BATCH = 64


class TutorialEncoder(nn.Module):
    def __init__(self, latent_dims: int) -> None:
        super().__init__()
        self.linear1 = nn.Linear(784, 512)
        self.linear2 = nn.Linear(512, latent_dims)
        self.linear3 = nn.Linear(512, latent_dims)
        self.kl = torch.tensor(0.0)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = F.relu(self.linear1(torch.flatten(x, start_dim=1)))
        mu, logvar = self.linear2(x), self.linear3(x)
        eps = torch.randn(mu.size(0), mu.size(1)).to(mu.device)  # drawn on the CPU, then moved
        z = mu + eps * torch.exp(logvar / 2.0)
        self.kl = -0.5 * torch.sum(1 + logvar - mu**2 - torch.exp(logvar), dim=1).mean()
        return z


class TutorialDecoder(nn.Module):
    def __init__(self, latent_dims: int) -> None:
        super().__init__()
        self.linear1 = nn.Linear(latent_dims, 512)
        self.linear2 = nn.Linear(512, 784)

    def forward(self, z: torch.Tensor) -> torch.Tensor:
        return torch.sigmoid(self.linear2(F.relu(self.linear1(z)))).reshape((-1, 1, 28, 28))


class TutorialVAE(nn.Module):
    def __init__(self, latent_dims: int = 2) -> None:
        super().__init__()
        self.encoder = TutorialEncoder(latent_dims)
        self.decoder = TutorialDecoder(latent_dims)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.decoder(self.encoder(x))

    def to_vaelab(self) -> VAE:
        """The same weights in vaelab's VAE (fused mu/logvar head), to evaluate them alike."""
        vae = VAE(self.encoder.linear2.out_features, (512,))
        with torch.no_grad():
            vae.encoder[0].load_state_dict(self.encoder.linear1.state_dict())
            vae.enc_head.weight.copy_(
                torch.cat([self.encoder.linear2.weight, self.encoder.linear3.weight])
            )
            vae.enc_head.bias.copy_(
                torch.cat([self.encoder.linear2.bias, self.encoder.linear3.bias])
            )
            vae.decoder[0].load_state_dict(self.decoder.linear1.state_dict())
            vae.decoder[2].load_state_dict(self.decoder.linear2.state_dict())
        return vae.to(self.encoder.linear1.weight.device)
