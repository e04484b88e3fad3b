"""Greedy generation with the one-token decode step captured in a CUDA graph.

The graph reads the current token and position from static device tensors, writes the argmax token
back into them and into a history buffer, and advances the position, so a run of N tokens is N graph
replays and one synchronisation at the end. Prefill runs eagerly (one forward over the prompt).
"""

from __future__ import annotations

import torch

from ..errors import HarpqError
from .decoder import Decoder


class DecodeRunner:
    def __init__(self, decoder: Decoder, batch: int, max_len: int, graph: bool | None = None):
        self.decoder, self.batch, self.max_len = decoder, batch, max_len
        self.use_graph = decoder.device.type == "cuda" and decoder.graphable if graph is None else graph
        device = decoder.device
        decoder.setup_cache(batch, max_len)
        self.token = torch.zeros(batch, 1, dtype=torch.long, device=device)
        self.pos = torch.zeros(1, dtype=torch.long, device=device)
        self.history = torch.zeros(batch, max_len, dtype=torch.long, device=device)
        self.graph: torch.cuda.CUDAGraph | None = None

    @torch.no_grad()
    def _step(self) -> None:
        logits = self.decoder(self.token, self.pos)
        nxt = logits.argmax(-1, keepdim=True)
        self.token.copy_(nxt)
        self.history.index_copy_(1, self.pos + 1, nxt)
        self.pos.add_(1)

    @torch.no_grad()
    def prefill(self, prompt: torch.Tensor) -> None:
        """Run the prompt (B, T) and leave its greedy next token in `token` at position T−1... T."""
        b, t = prompt.shape
        if b != self.batch or t + 1 > self.max_len:
            raise HarpqError(f"prompt of shape {tuple(prompt.shape)} does not fit batch {self.batch}, "
                             f"max_len {self.max_len}")
        prompt = prompt.to(self.decoder.device)
        self.history[:, :t] = prompt
        logits = self.decoder(prompt, torch.arange(t, device=prompt.device))
        self.token.copy_(logits.argmax(-1, keepdim=True))
        self.history[:, t:t + 1] = self.token
        self.pos.fill_(t)

    def _capture(self) -> None:
        """Warm up (Triton autotuning, allocator) on a side stream, then capture one step."""
        saved = self.pos.clone(), self.token.clone()
        stream = torch.cuda.Stream()
        stream.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(stream):
            for _ in range(3):
                self._step()
        torch.cuda.current_stream().wait_stream(stream)
        self.graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(self.graph):
            self._step()
        self.pos.copy_(saved[0])
        self.token.copy_(saved[1])

    def step(self) -> None:
        if not self.use_graph:
            self._step()
            return
        if self.graph is None:
            self._capture()
        self.graph.replay()

    def decode(self, steps: int) -> None:
        """`steps` more tokens after the prefill (the cache must have room)."""
        if int(self.pos.item()) + steps >= self.max_len:
            raise HarpqError(f"{steps} more tokens do not fit max_len {self.max_len}")
        for _ in range(steps):
            self.step()

    @torch.no_grad()
    def generate(self, prompt: torch.Tensor, max_new_tokens: int) -> torch.Tensor:
        """Greedy continuation: (B, T) prompt -> (B, max_new_tokens) new tokens."""
        t = prompt.shape[1]
        self.prefill(prompt)
        self.decode(max_new_tokens - 1)
        return self.history[:, t:t + max_new_tokens].clone()
