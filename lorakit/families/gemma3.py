"""Gemma 3 (text): sliding-window layers, scaled embeddings, norms that multiply by 1 + weight, a
SentencePiece-style vocabulary, the assistant named "model" and the system turn folded into the first
user turn."""

from __future__ import annotations

from .family import Family

# Gemma's template in Ollama's language: the system prompt opens the first user turn, the assistant is "model";
# BOS is not written (llama.cpp adds it: add_bos_token in the GGUF).
GEMMA = ("{{- $first := true }}{{- range .Messages }}{{- if eq .Role \"user\" }}<start_of_turn>user\n"
         "{{ if and $first $.System }}{{ $.System }}\n\n{{ end }}{{ .Content }}<end_of_turn>\n{{ $first = false }}"
         "{{- else if eq .Role \"assistant\" }}<start_of_turn>model\n{{ .Content }}<end_of_turn>\n"
         "{{ end }}{{- end }}<start_of_turn>model\n")


def _metadata(writer, config: dict) -> None:
    """What llama.cpp's converter writes for Gemma 3 beyond the common hyperparameters."""
    head_dim = config.get("head_dim", 256)
    writer.add_key_length(head_dim)
    writer.add_value_length(head_dim)
    if config.get("sliding_window") and config.get("sliding_window_pattern", 0) != 1:
        writer.add_sliding_window(config["sliding_window"])
    if config.get("final_logit_softcapping"):
        writer.add_final_logit_softcapping(config["final_logit_softcapping"])


FAMILY = Family(name="Gemma 3", model_types=("gemma3_text",), checkpoints="Gemma 3 1B/270M text (pt and it)",
                gguf_arch="gemma3", gguf_vocab="llama", ollama_template=GEMMA, norm_shift=1.0,
                gguf_extra=_metadata)
