{{/* ------------------------------------------------------------------ names and labels */}}

{{- define "refresher.name" -}}
{{- default .Chart.Name .Values.nameOverride | trunc 63 | trimSuffix "-" -}}
{{- end -}}

{{- define "refresher.fullname" -}}
{{- if .Values.fullnameOverride -}}
{{- .Values.fullnameOverride | trunc 63 | trimSuffix "-" -}}
{{- else -}}
{{- $name := default .Chart.Name .Values.nameOverride -}}
{{- if contains $name .Release.Name -}}
{{- .Release.Name | trunc 63 | trimSuffix "-" -}}
{{- else -}}
{{- printf "%s-%s" .Release.Name $name | trunc 63 | trimSuffix "-" -}}
{{- end -}}
{{- end -}}
{{- end -}}

{{- define "refresher.chart" -}}
{{- printf "%s-%s" .Chart.Name .Chart.Version | replace "+" "_" | trunc 63 | trimSuffix "-" -}}
{{- end -}}

{{- define "refresher.selectorLabels" -}}
app.kubernetes.io/name: {{ include "refresher.name" . }}
app.kubernetes.io/instance: {{ .Release.Name }}
{{- end -}}

{{- define "refresher.labels" -}}
helm.sh/chart: {{ include "refresher.chart" . }}
{{ include "refresher.selectorLabels" . }}
app.kubernetes.io/version: {{ .Chart.AppVersion | quote }}
app.kubernetes.io/managed-by: {{ .Release.Service }}
{{- with .Values.commonLabels }}
{{ toYaml . }}
{{- end }}
{{- end -}}

{{- define "refresher.serviceAccountName" -}}
{{- if .Values.serviceAccount.create -}}
{{- default (include "refresher.fullname" .) .Values.serviceAccount.name -}}
{{- else -}}
{{- default "default" .Values.serviceAccount.name -}}
{{- end -}}
{{- end -}}

{{- define "refresher.image" -}}
{{- $tag := default .Chart.AppVersion .Values.image.tag -}}
{{- if .Values.image.digest -}}
{{- printf "%s:%s@%s" .Values.image.repository $tag .Values.image.digest -}}
{{- else -}}
{{- printf "%s:%s" .Values.image.repository $tag -}}
{{- end -}}
{{- end -}}

{{- define "refresher.credentialsSecretName" -}}
{{- if .Values.credentials.existingSecret -}}
{{- .Values.credentials.existingSecret -}}
{{- else if .Values.credentials.create -}}
{{- printf "%s-credentials" (include "refresher.fullname" .) -}}
{{- end -}}
{{- end -}}

{{/* ------------------------------------------------------------------ the effective config

The user's `config` with the chart's overlays, as YAML:
- metrics: enabled, on metrics.bind and metrics.port (what the Service and the probes use);
- every `type: kubernetes` sink gets the release namespace unless it names one;
- deployment mode: leader election is on when replicaCount > 1 (or when the config turns it
  on), with a Lease named after the release in the release namespace unless the config names
  them; other modes: no leader election (a CronJob with concurrencyPolicy Forbid, or one
  sidecar per pod, is the only writer);
- api: from the `api` value when it is enabled, else absent. `config.api` is refused rather
  than replaced: replacing it with the disabled default would switch off, without a word, a
  listener the consumers count on. Refused too, each with its reason: the api in cronjob mode
  (`refresher once` serves nothing); a loopback listener in deployment mode (the consumers run
  in other pods: nothing could reach it); a port equal to metrics.port; a listener other pods
  can reach while a token job lacks `consumers` (who may read it); and, with leader election,
  a job without a `type: kubernetes` sink (a follower serves what it watches in that Secret);
- proxies (config.tokens[].proxy): passed through as they are, refused for the same reasons
  as the api (cronjob mode, loopback in deployment mode, no `consumers` on a listener other
  pods can reach, a port another listener has, no Secret sink with leader election).
*/}}
{{- define "refresher.configData" -}}
{{- $config := deepCopy (.Values.config | default dict) -}}
{{- $namespace := .Release.Namespace -}}
{{- range $job := (get $config "tokens" | default list) -}}
{{- if kindIs "map" $job -}}
{{- range $sink := (get $job "sinks" | default list) -}}
{{- if and (kindIs "map" $sink) (eq (toString (get $sink "type")) "kubernetes") (empty (get $sink "namespace")) -}}
{{- $_ := set $sink "namespace" $namespace -}}
{{- end -}}
{{- end -}}
{{- end -}}
{{- end -}}
{{- $_ := set $config "metrics" (dict "enabled" true "bind" .Values.metrics.bind "port" (int .Values.metrics.port)) -}}
{{- if hasKey $config "api" -}}
{{- fail "config.api: the chart renders the refresher's api from the `api` value; set api.enabled, api.listen and api.maxConnections instead" -}}
{{- end -}}
{{- if .Values.api.enabled -}}
{{- $listen := toString .Values.api.listen -}}
{{- $loopback := include "refresher.apiLoopback" . -}}
{{- if eq .Values.mode "cronjob" -}}
{{- fail "api.enabled: in cronjob mode `refresher once` exits after one pass and serves nothing; the token API needs mode deployment (or sidecar)" -}}
{{- end -}}
{{- if and (eq .Values.mode "deployment") $loopback -}}
{{- fail (printf "api.listen: %s is a loopback address, and in deployment mode the consumers run in other pods, so nothing could reach it: listen on 0.0.0.0:PORT (or [::]:PORT) and give every token job `consumers`, or use mode sidecar" $listen) -}}
{{- end -}}
{{- $port := include "refresher.apiPort" . -}}
{{- if eq $port (toString (int .Values.metrics.port)) -}}
{{- fail (printf "api.listen: port %s is metrics.port too; give the api listener a port of its own" $port) -}}
{{- end -}}
{{- if not $loopback -}}
{{- range $index, $job := (get $config "tokens" | default list) -}}
{{- if and (kindIs "map" $job) (not (get $job "consumers")) -}}
{{- fail (printf "config.tokens[%d] (%s): api.listen %s is reachable from other pods, so every token job must say who may read its token: give it `consumers` (service_accounts or namespaces with an audience, or a bearer_key_file)" $index (toString (get $job "name")) $listen) -}}
{{- end -}}
{{- end -}}
{{- end -}}
{{- $api := dict "enabled" true "listen" $listen "max_connections" (int .Values.api.maxConnections) "max_staleness" .Values.api.maxStaleness -}}
{{- with .Values.api.tls.existingSecret -}}
{{- $mount := trimSuffix "/" $.Values.api.tls.mountPath -}}
{{- $_ := set $api "tls" (dict "cert_file" (printf "%s/tls.crt" $mount) "key_file" (printf "%s/tls.key" $mount)) -}}
{{- end -}}
{{- $_ := set $config "api" $api -}}
{{- end -}}
{{- if eq .Values.mode "deployment" -}}
{{- $election := get $config "leader_election" | default dict -}}
{{- if or (gt (int .Values.replicaCount) 1) (get $election "enabled") -}}
{{- $_ := set $election "enabled" true -}}
{{- if empty (get $election "name") -}}
{{- $_ := set $election "name" (include "refresher.fullname" .) -}}
{{- end -}}
{{- if empty (get $election "namespace") -}}
{{- $_ := set $election "namespace" $namespace -}}
{{- end -}}
{{- $_ := set $config "leader_election" $election -}}
{{- else -}}
{{- $_ := unset $config "leader_election" -}}
{{- end -}}
{{- else -}}
{{- $_ := unset $config "leader_election" -}}
{{- end -}}
{{- /* The proxies (config.tokens[].proxy) pass through as they are; refused, each with its
reason, as for the api: any proxy in cronjob mode; a loopback listener in deployment mode; a
listener other pods can reach on a job without `consumers`; a port another listener has. */ -}}
{{- $ports := dict (toString (int .Values.metrics.port)) "metrics.port" -}}
{{- if .Values.api.enabled -}}
{{- $_ := set $ports (include "refresher.apiPort" .) "api.listen's" -}}
{{- end -}}
{{- range $proxy := (include "refresher.proxies" . | fromYaml).proxies -}}
{{- $where := printf "config.tokens[%d] (%s)" (int $proxy.index) $proxy.name -}}
{{- if eq $.Values.mode "cronjob" -}}
{{- fail (printf "%s: a proxy in cronjob mode: `refresher once` exits after one pass and serves nothing; a proxy needs mode deployment (or sidecar)" $where) -}}
{{- end -}}
{{- if and (eq $.Values.mode "deployment") $proxy.loopback -}}
{{- fail (printf "%s: proxy.listen %s is a loopback address, and in deployment mode the consumers run in other pods, so nothing could reach it: listen on 0.0.0.0:PORT (or [::]:PORT) and give the job `consumers`, or use mode sidecar" $where $proxy.listen) -}}
{{- end -}}
{{- if and (not $proxy.loopback) (not (get (index $config.tokens (int $proxy.index)) "consumers")) -}}
{{- fail (printf "%s: proxy.listen %s is reachable from other pods, so the job must say who may call its API through the proxy: give it `consumers` (service_accounts or namespaces with an audience, or a bearer_key_file)" $where $proxy.listen) -}}
{{- end -}}
{{- with get $ports $proxy.port -}}
{{- fail (printf "%s: proxy.listen: port %s is %s too; give every listener a port of its own" $where $proxy.port .) -}}
{{- end -}}
{{- $_ := set $ports $proxy.port (printf "config.tokens[%d].proxy.listen's" (int $proxy.index)) -}}
{{- end -}}
{{- /* With leader election a follower serves, by the api and by the job's proxy, the token it
watches in the job's Secret: each job served either way needs a `type: kubernetes` sink. */ -}}
{{- if get (get $config "leader_election" | default dict) "enabled" -}}
{{- range $index, $job := (get $config "tokens" | default list) -}}
{{- if and (kindIs "map" $job) (or $.Values.api.enabled (get $job "proxy")) -}}
{{- $secretSink := false -}}
{{- range $sink := (get $job "sinks" | default list) -}}
{{- if and (kindIs "map" $sink) (eq (toString (get $sink "type")) "kubernetes") -}}
{{- $secretSink = true -}}
{{- end -}}
{{- end -}}
{{- if not $secretSink -}}
{{- if $.Values.api.enabled -}}
{{- fail (printf "config.tokens[%d] (%s): with leader election and the api on, every replica serves the token and a follower serves what it watches in the job's Secret: give the job a `type: kubernetes` sink" $index (toString (get $job "name"))) -}}
{{- else -}}
{{- fail (printf "config.tokens[%d] (%s): with leader election and a proxy, every replica serves the proxy and a follower sends the token it watches in the job's Secret: give the job a `type: kubernetes` sink" $index (toString (get $job "name"))) -}}
{{- end -}}
{{- end -}}
{{- end -}}
{{- end -}}
{{- end -}}
{{- toYaml $config -}}
{{- end -}}

{{/* ------------------------------------------------------------------ listeners

A listen value is "HOST:PORT" or "[IPv6]:PORT" (api.listen, config.tokens[].proxy.listen), or,
for a proxy, a bare port number, which the refresher binds on 127.0.0.1.
refresher.listenText: that value as "HOST:PORT". refresher.listenPort: its port (the digits
after the last ':'). refresher.listenLoopback: "true" when its host is a loopback address
(localhost, 127.x.x.x, [::1]): only the pod's own containers can connect, and the refresher
serves them without authentication.

refresher.apiPort, refresher.apiLoopback: the same for api.listen. refresher.apiServed: "true"
when the api is on and other pods can reach it (0.0.0.0, [::] or another address): then the
container gets an `api` port, and in deployment mode the API Service and the NetworkPolicy's
ingress rule exist.
*/}}
{{- define "refresher.listenText" -}}
{{- if or (kindIs "float64" .) (kindIs "int" .) (kindIs "int64" .) -}}
{{- printf "127.0.0.1:%d" (int .) -}}
{{- else -}}
{{- toString . -}}
{{- end -}}
{{- end -}}

{{- define "refresher.listenPort" -}}
{{- regexFind "[0-9]+$" (include "refresher.listenText" .) -}}
{{- end -}}

{{- define "refresher.listenLoopback" -}}
{{- $host := regexReplaceAll ":[0-9]+$" (include "refresher.listenText" .) "" | lower -}}
{{- if or (eq $host "localhost") (eq $host "[::1]") (regexMatch `^127\.[0-9]+\.[0-9]+\.[0-9]+$` $host) -}}true{{- end -}}
{{- end -}}

{{- define "refresher.apiPort" -}}
{{- include "refresher.listenPort" .Values.api.listen -}}
{{- end -}}

{{- define "refresher.apiLoopback" -}}
{{- include "refresher.listenLoopback" .Values.api.listen -}}
{{- end -}}

{{- define "refresher.apiServed" -}}
{{- if and .Values.api.enabled (not (include "refresher.apiLoopback" .)) -}}true{{- end -}}
{{- end -}}

{{/* ------------------------------------------------------------------ the proxies

A YAML map `{proxies: [...]}`, one entry per token job with a `proxy` (config.tokens[].proxy,
passed to the refresher as it is), in config order:
  index, name       the job's place in config.tokens and its name
  listen, port      proxy.listen as HOST:PORT, and its port
  loopback          the listener is on loopback: the pod's own containers only (sidecar mode)
  served            deployment mode and not loopback: the pods get a container port, the API
                    Service a port and the NetworkPolicy an ingress rule for it
  containerPort     the container port's name: `px-<index>` (always a valid port name: at
                    most 15 characters, lowercase letters, digits and '-'; stable when the
                    job is renamed)
  servicePort       the API Service port's name: the job's name, lower-cased, every run of
                    characters other than a-z and 0-9 turned into one '-', cut to 15
                    characters, without a '-' at either end; `px-<index>` instead when that
                    leaves no letter, looks like a `px-<n>` name itself, or is taken already
                    (`api`, `metrics`, or an earlier job's)
  tls               the proxy serves TLS (proxy.tls): appProtocol https
  upstream          proxy.upstream
  upstreamPort      its TCP port (443 or 80 unless it names one; "" when a `${NAME}` hides it)
  upstreamLeaves    its host is not loopback: the NetworkPolicy must let the pod reach it
*/}}
{{- define "refresher.proxies" -}}
{{- $proxies := list -}}
{{- $taken := list "api" "metrics" -}}
{{- range $index, $job := ((.Values.config | default dict).tokens | default list) -}}
{{- if and (kindIs "map" $job) (kindIs "map" (get $job "proxy")) -}}
{{- $proxy := get $job "proxy" -}}
{{- $listen := include "refresher.listenText" (get $proxy "listen") -}}
{{- $loopback := eq (include "refresher.listenLoopback" (get $proxy "listen")) "true" -}}
{{- $slug := regexReplaceAll "[^a-z0-9]+" (lower (toString (get $job "name"))) "-" | trimAll "-" | trunc 15 | trimSuffix "-" -}}
{{- $servicePort := $slug -}}
{{- if or (not (regexMatch "[a-z]" $slug)) (regexMatch "^px-[0-9]+$" $slug) (has $slug $taken) -}}
{{- $servicePort = printf "px-%d" $index -}}
{{- end -}}
{{- $taken = append $taken $servicePort -}}
{{- $target := include "refresher.urlTarget" (toString (get $proxy "upstream")) | fromYaml -}}
{{- $proxies = append $proxies (dict
    "index" $index
    "name" (toString (get $job "name"))
    "listen" $listen
    "port" (include "refresher.listenPort" (get $proxy "listen"))
    "loopback" $loopback
    "served" (and (eq $.Values.mode "deployment") (not $loopback))
    "containerPort" (printf "px-%d" $index)
    "servicePort" $servicePort
    "tls" (not (empty (get $proxy "tls")))
    "upstream" (toString (get $proxy "upstream"))
    "upstreamPort" $target.port
    "upstreamLeaves" $target.leaves) -}}
{{- end -}}
{{- end -}}
{{- toYaml (dict "proxies" $proxies) -}}
{{- end -}}

{{/* "true" when some job's proxy is served to other pods (deployment mode, not loopback). */}}
{{- define "refresher.proxiesServed" -}}
{{- $served := false -}}
{{- range $proxy := (include "refresher.proxies" . | fromYaml).proxies -}}
{{- $served = or $served $proxy.served -}}
{{- end -}}
{{- if $served -}}true{{- end -}}
{{- end -}}

{{/* The peers admitted to the token API and the proxies: api.allowedClients' podSelector
(with its namespaceSelector: {} every namespace, null or absent the release's only) and its
ipBlocks. */}}
{{- define "refresher.allowedClientsPeers" -}}
- podSelector:
    {{- toYaml .podSelector | nindent 4 }}
  {{- if hasKey . "namespaceSelector" }}
  {{- if not (kindIs "invalid" .namespaceSelector) }}
  namespaceSelector:
    {{- toYaml .namespaceSelector | nindent 4 }}
  {{- end }}
  {{- end }}
{{- range $cidr := (.ipBlocks | default list) }}
- ipBlock:
    cidr: {{ $cidr }}
{{- end }}
{{- end }}

{{/* ------------------------------------------------------------------ what Kubernetes access the config needs

A YAML map:
  namespaces:            one entry per namespace the refresher touches
    <namespace>:
      secrets: [names]   target Secrets (get, patch)
      watchSecrets: [n]  the Secret each job's replicas list and watch by name (list,
                         watch), its first `type: kubernetes` sink: with leader election, for
                         each job served by the token API or by its own proxy (followers
                         serve what the leader writes; the leader watches for the
                         followers' rejection reports)
      createSecrets: b   a sink there says `create: true` (create on secrets: RBAC cannot limit it by name)
      nudgePods: b       a Secret sink there has a `nudge` (list and patch on pods: RBAC cannot
                         limit patch to an annotation, nor to the selector's pods)
      leases: [names]    the Lease (get, patch)
      createLeases: b    the chart does not create the Lease (create on leases)
  precreate: [{name, namespace, type}]  target Secrets the chart may create
  lease: {name, namespace} or absent
  tokenReview: b         a job served by the api or its proxy has consumers naming
                         service_accounts or namespaces: the refresher checks their tokens
                         with TokenReviews (a ClusterRoleBinding to system:auth-delegator)
*/}}
{{- define "refresher.kubePlan" -}}
{{- $config := include "refresher.configData" . | fromYaml -}}
{{- $namespaces := dict -}}
{{- $precreate := list -}}
{{- $apiOn := ($config.api | default dict).enabled -}}
{{- $electing := ($config.leader_election | default dict).enabled -}}
{{- $tokenReview := false -}}
{{- range $job := ($config.tokens | default list) -}}
{{- /* Served to consumers: by the api (every job) or by the job's own proxy. */ -}}
{{- $served := or $apiOn (kindIs "map" $job.proxy) -}}
{{- $consumers := $job.consumers | default dict -}}
{{- if and $served (kindIs "map" $consumers) (or $consumers.service_accounts $consumers.namespaces) -}}
{{- $tokenReview = true -}}
{{- end -}}
{{- $watching := and $served $electing -}}
{{- $watched := false -}}
{{- range $sink := ($job.sinks | default list) -}}
{{- if eq (toString $sink.type) "kubernetes" -}}
{{- $entry := get $namespaces $sink.namespace | default (dict "secrets" (list) "watchSecrets" (list) "createSecrets" false "nudgePods" false "leases" (list) "createLeases" false) -}}
{{- $_ := set $entry "secrets" (append $entry.secrets $sink.name | uniq) -}}
{{- if and $watching (not $watched) -}}
{{- $_ := set $entry "watchSecrets" (append $entry.watchSecrets $sink.name | uniq) -}}
{{- $watched = true -}}
{{- end -}}
{{- if $sink.create -}}
{{- $_ := set $entry "createSecrets" true -}}
{{- end -}}
{{- /* nudge: after each write, list the pods its selector names in the Secret's namespace
and patch one annotation onto those that mount the Secret. */ -}}
{{- if $sink.nudge -}}
{{- $_ := set $entry "nudgePods" true -}}
{{- end -}}
{{- $_ := set $namespaces $sink.namespace $entry -}}
{{- $precreate = append $precreate (dict "name" $sink.name "namespace" $sink.namespace "type" (default "Opaque" $sink.secret_type)) -}}
{{- end -}}
{{- end -}}
{{- end -}}
{{- $plan := dict "namespaces" $namespaces "precreate" $precreate "tokenReview" $tokenReview -}}
{{- $election := $config.leader_election | default dict -}}
{{- if $election.enabled -}}
{{- $entry := get $namespaces $election.namespace | default (dict "secrets" (list) "watchSecrets" (list) "createSecrets" false "nudgePods" false "leases" (list) "createLeases" false) -}}
{{- $_ := set $entry "leases" (append $entry.leases $election.name | uniq) -}}
{{- if not $.Values.leaderElection.createLease -}}
{{- $_ := set $entry "createLeases" true -}}
{{- end -}}
{{- $_ := set $namespaces $election.namespace $entry -}}
{{- $_ := set $plan "lease" (dict "name" $election.name "namespace" $election.namespace) -}}
{{- end -}}
{{- toYaml $plan -}}
{{- end -}}

{{/* ------------------------------------------------------------------ where the probes and the proxies go

refresher.urlTarget: for a URL, a YAML map `{port, leaves}`: `port` its TCP port (443 or 80
unless it names one; "" when a `${NAME}` hides it) and `leaves` true when its host is not
loopback (localhost, 127.x or [::1]), so a NetworkPolicy must let the pod reach it.

refresher.probeTargets: a YAML map `{probes: [{where, port}]}`: every token job's probe whose
URL leaves the pod, with `where` its path in the config and `port` the URL's TCP port. The
NetworkPolicy needs them: a probe the policy blocks only ever errs, which never refreshes,
and self-healing would be off without a word.
*/}}
{{- define "refresher.urlTarget" -}}
{{- $url := toString . -}}
{{- $scheme := lower (regexFind "^[A-Za-z][A-Za-z0-9+.-]*://" $url | trimSuffix "://") -}}
{{- $authority := regexReplaceAll "^[A-Za-z][A-Za-z0-9+.-]*://([^/?#]*).*$" $url "${1}" -}}
{{- $authority = regexReplaceAll "^.*@" $authority "" | lower -}}
{{- $host := regexReplaceAll `^(\[[^\]]*\]|[^:]*).*$` $authority "${1}" -}}
{{- $port := regexFind ":[0-9]+$" (trimPrefix $host $authority) | trimPrefix ":" -}}
{{- if and (not $port) (not (contains "${" $authority)) -}}
{{- $port = ternary "80" "443" (eq $scheme "http") -}}
{{- end -}}
{{- $loopback := or (eq $host "localhost") (eq $host "[::1]") (regexMatch `^127\.[0-9]+\.[0-9]+\.[0-9]+$` $host) -}}
{{- toYaml (dict "port" $port "leaves" (not $loopback)) -}}
{{- end -}}

{{- define "refresher.probeTargets" -}}
{{- $config := include "refresher.configData" . | fromYaml -}}
{{- $probes := list -}}
{{- range $index, $job := ($config.tokens | default list) -}}
{{- if and (kindIs "map" $job) (kindIs "map" (get $job "probe")) -}}
{{- $target := include "refresher.urlTarget" (get $job.probe "url") | fromYaml -}}
{{- if $target.leaves -}}
{{- $probes = append $probes (dict "where" (printf "config.tokens[%d].probe" $index) "port" $target.port) -}}
{{- end -}}
{{- end -}}
{{- end -}}
{{- toYaml (dict "probes" $probes) -}}
{{- end -}}

{{/* Whether the pod talks to the API server at all (Secrets, the Lease, TokenReviews, the pods
a Secret sink's nudge patches, which only a Secret sink has): "true" or "". */}}
{{- define "refresher.usesKubernetes" -}}
{{- $plan := include "refresher.kubePlan" . | fromYaml -}}
{{- if or $plan.namespaces $plan.tokenReview -}}true{{- end -}}
{{- end -}}

{{/* ------------------------------------------------------------------ client authentication

refresher.clientAuthVolumes: a YAML map `{volumes: [...]}`, one entry per volume of client
authentication material the pod mounts, in this order:
  client-key       clientAuth.privateKey.existingSecret set: the Secret (private_key_jwt)
  client-cert      clientAuth.clientCertificate.existingSecret set: the Secret (mTLS)
  federated-token  clientAuth.federatedToken.enabled: a projected service-account token
                   (federated_jwt) for `audience`, `expirationSeconds`, at `fileName`
each with `value` (the value naming its mountPath, for messages), `mountPath` (cleaned) and
either `secretName` or `audience`, `expirationSeconds` and `fileName`. Mounted read-only and
never by subPath, so the kubelet's updates (cert-manager's renewals, the token's rotation at
80% of its lifetime) reach the refresher, which re-reads the files.
*/}}
{{- define "refresher.clientAuthVolumes" -}}
{{- $auth := .Values.clientAuth | default dict -}}
{{- $volumes := list -}}
{{- with ($auth.privateKey | default dict) -}}
{{- if .existingSecret -}}
{{- $volumes = append $volumes (dict "name" "client-key" "value" "clientAuth.privateKey.mountPath" "mountPath" (clean (toString .mountPath)) "secretName" .existingSecret) -}}
{{- end -}}
{{- end -}}
{{- with ($auth.clientCertificate | default dict) -}}
{{- if .existingSecret -}}
{{- $volumes = append $volumes (dict "name" "client-cert" "value" "clientAuth.clientCertificate.mountPath" "mountPath" (clean (toString .mountPath)) "secretName" .existingSecret) -}}
{{- end -}}
{{- end -}}
{{- with ($auth.federatedToken | default dict) -}}
{{- if .enabled -}}
{{- $volumes = append $volumes (dict "name" "federated-token" "value" "clientAuth.federatedToken.mountPath" "mountPath" (clean (toString .mountPath)) "audience" (toString .audience) "expirationSeconds" (int64 .expirationSeconds) "fileName" (toString .fileName)) -}}
{{- end -}}
{{- end -}}
{{- toYaml (dict "volumes" $volumes) -}}
{{- end -}}

{{/* refresher.checkClientAuth: renders nothing; fails when a client-authentication volume
could not be mounted as asked. Its mountPath must be absolute and must neither equal, lie in
nor contain another mount of the refresher container: the config file, /tmp, the credentials
and the api's TLS Secret, the service-account token (when mounted), the Azure Workload
Identity webhook's token (with the pod label azure.workload.identity/use), extraVolumeMounts
and the other client-authentication volumes. (Equal paths are refused by the API server;
a mount inside a read-only Secret volume cannot be created, and one over a directory hides
what is there.) A federated token needs an audience. */}}
{{- define "refresher.checkClientAuth" -}}
{{- $volumes := (include "refresher.clientAuthVolumes" . | fromYaml).volumes -}}
{{- $others := list (dict "value" "the config file" "mountPath" "/etc/refresher/config.yaml") (dict "value" "/tmp" "mountPath" "/tmp") -}}
{{- if include "refresher.credentialsSecretName" . -}}
{{- $others = append $others (dict "value" "credentials.mountPath" "mountPath" (clean (toString .Values.credentials.mountPath))) -}}
{{- end -}}
{{- if and .Values.api.enabled .Values.api.tls.existingSecret -}}
{{- $others = append $others (dict "value" "api.tls.mountPath" "mountPath" (clean (toString .Values.api.tls.mountPath))) -}}
{{- end -}}
{{- if include "refresher.usesKubernetes" . -}}
{{- $others = append $others (dict "value" "the service-account token" "mountPath" "/var/run/secrets/kubernetes.io/serviceaccount") -}}
{{- end -}}
{{- if eq (toString (get (.Values.podLabels | default dict) "azure.workload.identity/use")) "true" -}}
{{- $others = append $others (dict "value" "the Azure Workload Identity webhook's token" "mountPath" "/var/run/secrets/azure/tokens") -}}
{{- end -}}
{{- range $index, $mount := (.Values.extraVolumeMounts | default list) -}}
{{- $others = append $others (dict "value" (printf "extraVolumeMounts[%d].mountPath" $index) "mountPath" (clean (toString $mount.mountPath))) -}}
{{- end -}}
{{- range $index, $volume := $volumes -}}
{{- if not (isAbs $volume.mountPath) -}}
{{- fail (printf "%s: %s is not an absolute path" $volume.value $volume.mountPath) -}}
{{- end -}}
{{- if and (eq $volume.name "federated-token") (not (trim $volume.audience)) -}}
{{- fail "clientAuth.federatedToken.audience: an enabled federated token needs the audience the IdP expects (api://AzureADTokenExchange for Entra ID, the realm's URL for Keycloak)" -}}
{{- end -}}
{{- range $other := concat $others (slice $volumes 0 $index) -}}
{{- $a := $volume.mountPath -}}
{{- $b := $other.mountPath -}}
{{- $relation := "" -}}
{{- if eq $a $b -}}
{{- $relation = "is" -}}
{{- else if hasPrefix (printf "%s/" (trimSuffix "/" $b)) $a -}}
{{- $relation = "lies in" -}}
{{- else if hasPrefix (printf "%s/" (trimSuffix "/" $a)) $b -}}
{{- $relation = "contains" -}}
{{- end -}}
{{- if $relation -}}
{{- fail (printf "%s: %s %s %s (%s): give each volume a directory of its own, neither inside another nor around one" $volume.value $a $relation $other.value $b) -}}
{{- end -}}
{{- end -}}
{{- end -}}
{{- end -}}

{{/* ------------------------------------------------------------------ the pod */}}

{{- define "refresher.podTemplate" -}}
{{- $usesKube := include "refresher.usesKubernetes" . -}}
{{- $clientAuth := (include "refresher.clientAuthVolumes" . | fromYaml).volumes -}}
metadata:
  labels:
    {{- include "refresher.labels" . | nindent 4 }}
    {{- with .Values.podLabels }}
    {{- toYaml . | nindent 4 }}
    {{- end }}
  annotations:
    checksum/config: {{ include "refresher.configData" . | sha256sum }}
    {{- with .Values.podAnnotations }}
    {{- toYaml . | nindent 4 }}
    {{- end }}
spec:
  serviceAccountName: {{ include "refresher.serviceAccountName" . }}
  automountServiceAccountToken: {{ ternary "true" "false" (eq $usesKube "true") }}
  enableServiceLinks: false
  {{- if eq .Values.mode "cronjob" }}
  restartPolicy: Never
  {{- end }}
  terminationGracePeriodSeconds: {{ .Values.terminationGracePeriodSeconds }}
  {{- with .Values.priorityClassName }}
  priorityClassName: {{ . }}
  {{- end }}
  {{- with .Values.imagePullSecrets }}
  imagePullSecrets:
    {{- toYaml . | nindent 4 }}
  {{- end }}
  securityContext:
    {{- toYaml .Values.podSecurityContext | nindent 4 }}
  containers:
    - name: refresher
      image: {{ include "refresher.image" . | quote }}
      imagePullPolicy: {{ .Values.image.pullPolicy }}
      args:
        {{- if eq .Values.mode "cronjob" }}
        - once
        {{- else }}
        - run
        {{- end }}
        - --config
        - /etc/refresher/config.yaml
        - --log-format
        - {{ .Values.logFormat }}
        - --log-level
        - {{ .Values.logLevel }}
        {{- if and (eq .Values.mode "cronjob") .Values.cronjob.pushgateway }}
        - --pushgateway
        - {{ .Values.cronjob.pushgateway | quote }}
        {{- end }}
      env:
        # The Lease identity (leader election) and the log's pod name.
        - name: POD_NAME
          valueFrom:
            fieldRef:
              fieldPath: metadata.name
        {{- with .Values.extraEnv }}
        {{- toYaml . | nindent 8 }}
        {{- end }}
      {{- if eq .Values.mode "deployment" }}
      ports:
        - name: metrics
          containerPort: {{ .Values.metrics.port }}
          protocol: TCP
        {{- if include "refresher.apiServed" . }}
        # The token API (the API Service's target); readiness stays /readyz on metrics.
        - name: api
          containerPort: {{ include "refresher.apiPort" . }}
          protocol: TCP
        {{- end }}
        {{- range $proxy := (include "refresher.proxies" . | fromYaml).proxies }}
        {{- if $proxy.served }}
        # The proxy of token job {{ $proxy.name }} (config.tokens[{{ $proxy.index }}]): px-<index>, a
        # valid port name whatever the job is called.
        - name: {{ $proxy.containerPort }}
          containerPort: {{ $proxy.port }}
          protocol: TCP
        {{- end }}
        {{- end }}
      {{- with .Values.livenessProbe }}
      livenessProbe:
        {{- toYaml . | nindent 8 }}
      {{- end }}
      {{- with .Values.readinessProbe }}
      readinessProbe:
        {{- toYaml . | nindent 8 }}
      {{- end }}
      {{- end }}
      securityContext:
        {{- toYaml .Values.securityContext | nindent 8 }}
      {{- with .Values.resources }}
      resources:
        {{- toYaml . | nindent 8 }}
      {{- end }}
      volumeMounts:
        - name: config
          mountPath: /etc/refresher/config.yaml
          subPath: config.yaml
          readOnly: true
        {{- if include "refresher.credentialsSecretName" . }}
        - name: credentials
          mountPath: {{ .Values.credentials.mountPath }}
          readOnly: true
        {{- end }}
        {{- if and .Values.api.enabled .Values.api.tls.existingSecret }}
        # Not a subPath: the kubelet updates the files when the Secret rotates, and the
        # refresher re-reads them.
        - name: api-tls
          mountPath: {{ .Values.api.tls.mountPath }}
          readOnly: true
        {{- end }}
        {{- range $volume := $clientAuth }}
        # {{ trimSuffix ".mountPath" $volume.value }}: not a subPath, so renewals reach the refresher.
        - name: {{ $volume.name }}
          mountPath: {{ $volume.mountPath }}
          readOnly: true
        {{- end }}
        - name: tmp
          mountPath: /tmp
        {{- with .Values.extraVolumeMounts }}
        {{- toYaml . | nindent 8 }}
        {{- end }}
  volumes:
    - name: config
      configMap:
        name: {{ include "refresher.fullname" . }}
    {{- with include "refresher.credentialsSecretName" . }}
    - name: credentials
      secret:
        secretName: {{ . }}
        defaultMode: 0440
    {{- end }}
    {{- if and .Values.api.enabled .Values.api.tls.existingSecret }}
    - name: api-tls
      secret:
        secretName: {{ .Values.api.tls.existingSecret }}
        defaultMode: 0440
    {{- end }}
    {{- range $volume := $clientAuth }}
    - name: {{ $volume.name }}
      {{- if $volume.secretName }}
      secret:
        secretName: {{ $volume.secretName }}
        defaultMode: 0440
      {{- else }}
      # A service-account token for the IdP (audience {{ $volume.audience }}, which the API
      # server does not accept); the kubelet renews it at 80% of its lifetime.
      projected:
        defaultMode: 0440
        sources:
          - serviceAccountToken:
              audience: {{ $volume.audience | quote }}
              expirationSeconds: {{ $volume.expirationSeconds }}
              path: {{ $volume.fileName | quote }}
      {{- end }}
    {{- end }}
    - name: tmp
      emptyDir:
        medium: Memory
        sizeLimit: {{ .Values.tmp.sizeLimit }}
    {{- with .Values.extraVolumes }}
    {{- toYaml . | nindent 4 }}
    {{- end }}
  {{- with .Values.nodeSelector }}
  nodeSelector:
    {{- toYaml . | nindent 4 }}
  {{- end }}
  {{- with .Values.tolerations }}
  tolerations:
    {{- toYaml . | nindent 4 }}
  {{- end }}
  {{- if .Values.affinity }}
  affinity:
    {{- toYaml .Values.affinity | nindent 4 }}
  {{- else if and (eq .Values.mode "deployment") (gt (int .Values.replicaCount) 1) }}
  affinity:
    podAntiAffinity:
      preferredDuringSchedulingIgnoredDuringExecution:
        - weight: 100
          podAffinityTerm:
            topologyKey: kubernetes.io/hostname
            labelSelector:
              matchLabels:
                {{- include "refresher.selectorLabels" . | nindent 16 }}
  {{- end }}
  {{- with .Values.topologySpreadConstraints }}
  topologySpreadConstraints:
    {{- toYaml . | nindent 4 }}
  {{- end }}
{{- end -}}
