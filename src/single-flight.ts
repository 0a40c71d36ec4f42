// One piece of work per key at a time: the first caller runs it, callers that arrive while it runs get
// the same promise. Nothing is kept once it settles (the caches keep results; this only joins).
export class SingleFlight<T> {
  private readonly running = new Map<string, Promise<T>>();

  /** `led`: this caller ran the work (its own request went upstream); otherwise it joined. */
  async run(key: string, work: () => Promise<T>): Promise<{ value: T; led: boolean }> {
    const running = this.running.get(key);
    if (running) return { value: await running, led: false };
    const started = work().finally(() => this.running.delete(key));
    this.running.set(key, started);
    return { value: await started, led: true };
  }

  get size(): number {
    return this.running.size;
  }
}
