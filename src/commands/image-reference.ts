// Image references as users type them: "alpine", "library/alpine:3.20", "ghcr.io/org/app@sha256:…",
// "registry.example.com:5443/team/app:v1". Docker Hub names get its real registry host and library/.

export interface ImageReference {
  /** host or host:port, as used in URLs and the Host header. */
  registry: string;
  repository: string;
  /** A tag or a digest. */
  reference: string;
}

const DOCKER_HUB = 'registry-1.docker.io';

export function parseImageReference(text: string): ImageReference {
  let rest = text.trim();
  let registry = DOCKER_HUB;
  const slash = rest.indexOf('/');
  const first = slash < 0 ? '' : rest.slice(0, slash);
  // The first component is a registry when it looks like a host: a dot, a port, or localhost.
  if (first && (first.includes('.') || first.includes(':') || first === 'localhost')) {
    registry = first === 'docker.io' || first === 'index.docker.io' ? DOCKER_HUB : first;
    rest = rest.slice(slash + 1);
  }
  let reference = 'latest';
  const at = rest.indexOf('@');
  if (at >= 0) {
    reference = rest.slice(at + 1);
    rest = rest.slice(0, at);
  } else {
    const colon = rest.lastIndexOf(':');
    if (colon >= 0) {
      reference = rest.slice(colon + 1);
      rest = rest.slice(0, colon);
    }
  }
  if (registry === DOCKER_HUB && !rest.includes('/')) rest = `library/${rest}`;
  if (!/^[a-z0-9]+(?:(?:[._]|__|-+)[a-z0-9]+)*(?:\/[a-z0-9]+(?:(?:[._]|__|-+)[a-z0-9]+)*)*$/.test(rest)) {
    throw new Error(`"${text}" is not an image reference (examples: alpine:3.20, ghcr.io/org/app@sha256:…)`);
  }
  return { registry, repository: rest, reference };
}
