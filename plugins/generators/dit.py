"""DiT/SiT-style diffusion transformer trained by flow matching: the whole network denoises."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from nestar_plugins.scale_modules.layers import AdaLNAttnBlock, _modulate, sincos_2d, timestep_features
from torch import Tensor, nn

from nestar_lab.interfaces import Params, PassOptions, ScaleModuleSpec, TokenSample
from nestar_lab.method.flow import draw_path, solve_patch, with_null_labels
from nestar_lab.method.generator import Generator
from nestar_lab.method.losses import LossOutput
from nestar_lab.method.schedule import Schedule, single_step_schedule


class DiffusionTransformer(nn.Module):
    """Noisy tokens + time + label -> velocity of every token (DiT's design, flow-matching target).

    Tokens are embedded linearly plus fixed 2-D sine-cosine positions; time and class embeddings
    are summed into one conditioning vector that drives adaLN-Zero in every block (zero-initialised
    gates, so each block starts as the identity); attention is bidirectional over all n tokens;
    the output is an adaLN-modulated linear layer (zero-initialised) giving the velocity.
    """

    def __init__(self, spec: ScaleModuleSpec, width: int, depth: int, heads: int, mlp_ratio: float):
        super().__init__()
        self.spec = spec
        self.register_buffer("pos", sincos_2d(spec.coords, width), persistent=False)
        self.token_in = nn.Linear(spec.token_dim, width)
        self.time = nn.Sequential(nn.Linear(64, width), nn.SiLU(), nn.Linear(width, width))
        self.label_emb = nn.Embedding(spec.num_classes + 1, width)  # last row: the null label (CFG)
        self.blocks = nn.ModuleList(AdaLNAttnBlock(width, heads, mlp_ratio) for _ in range(depth))
        self.norm = nn.LayerNorm(width, elementwise_affine=False, eps=1e-6)
        self.ada = nn.Sequential(nn.SiLU(), nn.Linear(width, 2 * width))
        self.out = nn.Linear(width, spec.token_dim)
        nn.init.normal_(self.label_emb.weight, std=0.02)
        for layer in (self.ada[1], self.out):
            nn.init.zeros_(layer.weight)
            nn.init.zeros_(layer.bias)

    def forward(self, y_BLd: Tensor, t_BL: Tensor, labels_B: Tensor) -> Tensor:
        """Velocity ``(B, n, d)``; ``t_BL`` holds one time per image (its first column is read)."""
        c = self.time(timestep_features(t_BL[:, 0]).to(y_BLd.dtype)) + self.label_emb(labels_B)
        c = c[:, None, :]
        x = self.token_in(y_BLd) + self.pos.to(y_BLd.dtype)
        for block in self.blocks:
            x = block(x, c, None)
        shift, scale = self.ada(c).chunk(2, dim=-1)
        return self.out(_modulate(self.norm(x), shift, scale))

    def compile_parts(self, backend: str = "inductor") -> None:
        """``torch.compile`` the blocks (``train.compile``): every ODE evaluation runs them."""
        for block in self.blocks:
            block.compile(backend=backend)


class DiT(Generator):
    """Diffusion baseline in the manner of DiT/SiT (Peebles & Xie 2023; Ma et al. 2024): all n
    tokens in one step, integrated from noise by the ODE solver, and the diffusion transformer
    itself runs at every velocity evaluation (50 solver steps = 50 transformer passes). No KV
    cache: nothing is reused between evaluations.

    The transformer is sized by the scale module's ``width``, ``depth``, ``heads`` and
    ``mlp_ratio`` (so benchmarks match it like every other generator); the scale module's
    label prefix and flow head are not used. Trained with one (noise, time) draw per image and
    one time for all its tokens, as DiT/SiT do and as it samples. Simplified from DiT (see
    ``docs/baselines.md``): flow matching with an ODE solver instead of DDPM, no learned sigma.
    """

    class Params(Params):
        pass

    @classmethod
    def build_schedule(cls, params, num_tokens: int) -> Schedule:
        return single_step_schedule(num_tokens)

    def build_nets(self, make_module, count):
        module = make_module(0)
        p = module.params
        missing = [f for f in ("width", "depth", "heads", "mlp_ratio") if not hasattr(p, f)]
        if missing:
            raise ValueError(f"dit sizes its transformer by scale_module.params width, depth, heads, mlp_ratio; "
                             f"{type(module).__name__} has no {', '.join(missing)}")  # fmt: skip
        return [DiffusionTransformer(module.spec, p.width, p.depth, p.heads, p.mlp_ratio)]

    def training_losses(self, tokens_BND, labels_B, flow, coordination, rng, options=PassOptions()) -> LossOutput:
        """One stage: ``options.stages`` other than stage 0 is an error; no adjacent modules, so
        ``options.measure_disagreement`` logs nothing."""
        options.check_one_stage("DiT")
        n = tokens_BND.shape[1]
        one_patch = torch.zeros(n, dtype=torch.long, device=tokens_BND.device)
        ps = draw_path(tokens_BND, flow, rng, one_patch, draws=1)
        loss = F.mse_loss(self.nets[0](ps.y_t[0], ps.t[0], labels_B).float(), ps.target[0])
        return LossOutput(total=loss, parts={"flow_1": loss})

    @torch.no_grad()
    def sample_tokens(self, labels_B, plan, rng, token_dim) -> TokenSample:
        sp = plan[0]  # one stage: modules.1
        net, n = self.nets[0], self.schedule.num_tokens
        guided = sp.settings.cfg_scale != 1.0
        labels_in = with_null_labels(labels_B, net.spec.num_classes) if guided else labels_B
        result = solve_patch(sp.solver, net, labels_in, (labels_B.shape[0], n, token_dim), rng=rng, autocast=plan.autocast,
                             cfg_scale=sp.settings.scale_at(n, n), temperature=sp.settings.temperature, capture=sp.captured)  # fmt: skip
        return TokenSample(result.y1, result.nfe, 0, (result.nfe,))
