"""Dynamic expert skipping at inference (MC ODP, MoDES, learned top-any masks)."""
