"""Edges to the ecosystem (MONAI, Lightning). The core modules never import from here."""
