"""Engines that run a Flower ServerApp and ClientApp (in-process, simulation, deployment)."""
