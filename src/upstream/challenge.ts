// WWW-Authenticate challenges (RFC 9110 §11.6.1) as registries send them:
//   Bearer realm="https://auth.docker.io/token",service="registry.docker.io",scope="repository:library/alpine:pull"
//   Basic realm="Registry Realm"
// Quoted values may hold commas and escaped quotes; several challenges may share one header.

export interface Challenge {
  /** Lower case: "basic", "bearer". */
  scheme: string;
  /** Parameter names in lower case. */
  params: Record<string, string>;
}

const TOKEN = /^[!#$%&'*+.^_`|~0-9A-Za-z-]+/;

export function parseChallenges(header: string | string[] | undefined): Challenge[] {
  const challenges: Challenge[] = [];
  for (const value of Array.isArray(header) ? header : header ? [header] : []) {
    let rest = value.trim();
    let current: Challenge | undefined;
    while (rest.length > 0) {
      rest = rest.replace(/^[\s,]+/, '');
      const name = TOKEN.exec(rest)?.[0];
      if (!name) break;
      const afterName = rest.slice(name.length).replace(/^\s+/, '');
      // A token68 (Negotiate's or Basic's base64, "abc==") right after the scheme: no parameters.
      if (current && Object.keys(current.params).length === 0 && /^=*\s*(,|$)/.test(afterName) && afterName !== '' && !afterName.startsWith(',')) {
        rest = afterName.replace(/^=*/, '');
        continue;
      }
      if (afterName.startsWith('=') && current) {
        // name=value or name="quoted value"
        let valueText = afterName.slice(1).replace(/^\s+/, '');
        let parsed: string;
        if (valueText.startsWith('"')) {
          let i = 1;
          parsed = '';
          for (; i < valueText.length && valueText[i] !== '"'; i++) parsed += valueText[i] === '\\' ? valueText[++i] ?? '' : valueText[i];
          valueText = valueText.slice(i + 1);
        } else {
          parsed = TOKEN.exec(valueText)?.[0] ?? '';
          valueText = valueText.slice(parsed.length);
        }
        current.params[name.toLowerCase()] = parsed;
        rest = valueText;
        continue;
      }
      // A new scheme; a token68 after it (Basic's base64 form) carries no parameters we use.
      current = { scheme: name.toLowerCase(), params: {} };
      challenges.push(current);
      rest = afterName;
    }
  }
  return challenges;
}

/** The challenge the proxy can answer: Bearer before Basic (as Docker's clients choose). */
export function preferredChallenge(challenges: Challenge[]): Challenge | undefined {
  return challenges.find((c) => c.scheme === 'bearer' && c.params.realm) ?? challenges.find((c) => c.scheme === 'basic');
}
