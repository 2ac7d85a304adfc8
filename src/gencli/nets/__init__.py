"""Plain ``nn.Module`` building blocks: no losses, no optimisers, no Lightning."""
