"""Objectives as a room: what a run optimises. protocol.py says what an objective is; registry.py
resolves a config to one (sft, dpo, classification, or a class of your own by import path);
base.py gives a token-level objective's defaults; each built-in lives in a module of its own.
The protocol and the registry are torch-free: config validation asks them."""
