"""Integrations: policies, reranking server, step-level search."""
