"""TSA / M-TSA / TRD / REPA / LaMo alignment layer over diffusers CogVideoX."""
