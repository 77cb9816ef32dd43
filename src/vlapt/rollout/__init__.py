"""Rollouts: agents acting in env pools, episode by episode or decision by decision."""
