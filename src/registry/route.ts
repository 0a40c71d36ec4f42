// Typed routing of the distribution API (/v2/…): names, references and digests are parsed once here,
// at the edge, and the invalid ones are rejected with a registry-style error before anything else runs.

export type Digest = string & { readonly __brand: 'Digest' };
export type RepositoryName = string & { readonly __brand: 'RepositoryName' };
export type Tag = string & { readonly __brand: 'Tag' };

export type Route =
  | { kind: 'ping' }
  | { kind: 'catalog' }
  | { kind: 'manifest'; name: RepositoryName; reference: Digest | Tag; byDigest: boolean }
  | { kind: 'blob'; name: RepositoryName; digest: Digest }
  | { kind: 'upload'; name: RepositoryName }
  | { kind: 'tags'; name: RepositoryName }
  | { kind: 'referrers'; name: RepositoryName; digest: Digest }
  /** Not a distribution API path (a token endpoint on an intercepted realm host, for example). */
  | { kind: 'other' };

export interface RouteError {
  status: number;
  code: string;
  message: string;
}

// distribution's grammar: path components of lower-case alphanumerics joined by separators.
const COMPONENT = '[a-z0-9]+(?:(?:[._]|__|-+)[a-z0-9]+)*';
const NAME = new RegExp(`^${COMPONENT}(?:/${COMPONENT})*$`);
const TAG = /^[A-Za-z0-9_][A-Za-z0-9_.-]{0,127}$/;
const DIGEST = /^(sha256:[a-f0-9]{64}|sha512:[a-f0-9]{128})$/;
const DIGEST_LIKE = /^[a-z0-9]+(?:[.+_-][a-z0-9]+)*:/;

export function parseDigest(text: string): Digest | undefined {
  return DIGEST.test(text) ? (text as Digest) : undefined;
}

export function routeRequest(rawPath: string): Route | RouteError {
  const path = rawPath.split('?')[0]!;
  if (path === '/v2' || path === '/v2/') return { kind: 'ping' };
  if (!path.startsWith('/v2/')) return { kind: 'other' };
  let decoded: string;
  try {
    decoded = decodeURIComponent(path);
  } catch {
    return { status: 400, code: 'NAME_INVALID', message: 'the path is not valid percent-encoding' };
  }
  if (decoded.split('/').some((segment) => segment === '..' || segment === '.')) {
    return { status: 400, code: 'NAME_INVALID', message: 'path segments "." and ".." are not allowed' };
  }
  if (decoded === '/v2/_catalog') return { kind: 'catalog' };

  const match = /^\/v2\/(.+)\/(manifests|blobs|tags|referrers)\/(.*)$/.exec(decoded);
  // Not the distribution API but a registry's own endpoint under /v2/ (quay.io's token service is
  // /v2/auth): passed through like any other path.
  if (!match) return { kind: 'other' };
  const [, nameText, section, rest] = match as unknown as [string, string, string, string];
  if (!NAME.test(nameText) || nameText.length > 255) {
    return { status: 400, code: 'NAME_INVALID', message: `invalid repository name "${nameText}"` };
  }
  const name = nameText as RepositoryName;
  switch (section) {
    case 'manifests': {
      const digest = parseDigest(rest);
      if (digest) return { kind: 'manifest', name, reference: digest, byDigest: true };
      if (DIGEST_LIKE.test(rest)) return { status: 400, code: 'DIGEST_INVALID', message: `invalid digest "${rest}"` };
      if (!TAG.test(rest)) return { status: 400, code: 'TAG_INVALID', message: `invalid tag "${rest}"` };
      return { kind: 'manifest', name, reference: rest as Tag, byDigest: false };
    }
    case 'blobs': {
      if (rest === 'uploads' || rest === 'uploads/' || rest.startsWith('uploads/')) return { kind: 'upload', name };
      const digest = parseDigest(rest);
      if (!digest) return { status: 400, code: 'DIGEST_INVALID', message: `invalid digest "${rest}"` };
      return { kind: 'blob', name, digest };
    }
    case 'tags':
      if (rest !== 'list') break;
      return { kind: 'tags', name };
    case 'referrers': {
      const digest = parseDigest(rest);
      if (!digest) return { status: 400, code: 'DIGEST_INVALID', message: `invalid digest "${rest}"` };
      return { kind: 'referrers', name, digest };
    }
  }
  return { status: 404, code: 'NOT_FOUND', message: `no such API path: ${path}` };
}

export function isRouteError(route: Route | RouteError): route is RouteError {
  return 'status' in route;
}
