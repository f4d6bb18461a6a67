"""What exists for speed and bookkeeping, apart from the method: memory-lean context
encoders (`encoders`), the activation-memory tracker and the CPU allocator setting
(`memory`). The method (model, losses, the local-learning step, tables) never imports this
package; the trainer does."""
