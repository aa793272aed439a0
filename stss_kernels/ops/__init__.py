"""One subpackage per op: its public function and nn.Module (op.py), naive reference, torch and Triton backends."""
