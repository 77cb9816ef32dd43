"""Rollouts: agents acting in env pools, episode by episode (`episodes`), decision by decision (`chunked`),
or in groups of episodes sharing a configuration (`groups`)."""
