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
  a job without a `type: kubernetes` sink (a follower serves what it watches in that Secret).
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
{{- if and .Values.api.enabled (get (get $config "leader_election" | default dict) "enabled") -}}
{{- range $index, $job := (get $config "tokens" | default list) -}}
{{- if kindIs "map" $job -}}
{{- $secretSink := false -}}
{{- range $sink := (get $job "sinks" | default list) -}}
{{- if and (kindIs "map" $sink) (eq (toString (get $sink "type")) "kubernetes") -}}
{{- $secretSink = true -}}
{{- end -}}
{{- end -}}
{{- if not $secretSink -}}
{{- fail (printf "config.tokens[%d] (%s): with leader election and the api on, every replica serves the token and a follower serves what it watches in the job's Secret: give the job a `type: kubernetes` sink" $index (toString (get $job "name"))) -}}
{{- end -}}
{{- end -}}
{{- end -}}
{{- end -}}
{{- toYaml $config -}}
{{- end -}}

{{/* ------------------------------------------------------------------ the api listener

refresher.apiPort: the port of api.listen. refresher.apiLoopback: "true" when its host is a
loopback address (localhost, 127.x.x.x, [::1]): only the pod's own containers can connect,
and the refresher serves them without authentication. refresher.apiServed: "true" when the
api is on and other pods can reach it (0.0.0.0, [::] or another address): then the container
gets an `api` port, and in deployment mode the API Service and the NetworkPolicy's ingress
rule exist.
*/}}
{{- define "refresher.apiPort" -}}
{{- regexFind "[0-9]+$" (toString .Values.api.listen) -}}
{{- end -}}

{{- define "refresher.apiLoopback" -}}
{{- $host := regexReplaceAll ":[0-9]+$" (toString .Values.api.listen) "" | lower -}}
{{- if or (eq $host "localhost") (eq $host "[::1]") (regexMatch `^127\.[0-9]+\.[0-9]+\.[0-9]+$` $host) -}}true{{- end -}}
{{- end -}}

{{- define "refresher.apiServed" -}}
{{- if and .Values.api.enabled (not (include "refresher.apiLoopback" .)) -}}true{{- end -}}
{{- end -}}

{{/* ------------------------------------------------------------------ what Kubernetes access the config needs

A YAML map:
  namespaces:            one entry per namespace the refresher touches
    <namespace>:
      secrets: [names]   target Secrets (get, patch)
      watchSecrets: [n]  the Secret each job's replicas list and watch by name (list,
                         watch), its first `type: kubernetes` sink: the token API with leader
                         election (followers serve what the leader writes; the leader
                         watches for the followers' rejection reports)
      createSecrets: b   a sink there says `create: true` (create on secrets: RBAC cannot limit it by name)
      leases: [names]    the Lease (get, patch)
      createLeases: b    the chart does not create the Lease (create on leases)
  precreate: [{name, namespace, type}]  target Secrets the chart may create
  lease: {name, namespace} or absent
  tokenReview: b         the api is on and a job's consumers name service_accounts or
                         namespaces: the refresher checks their tokens with TokenReviews
                         (a ClusterRoleBinding to system:auth-delegator)
*/}}
{{- define "refresher.kubePlan" -}}
{{- $config := include "refresher.configData" . | fromYaml -}}
{{- $namespaces := dict -}}
{{- $precreate := list -}}
{{- $apiOn := ($config.api | default dict).enabled -}}
{{- $watching := and $apiOn ($config.leader_election | default dict).enabled -}}
{{- $tokenReview := false -}}
{{- range $job := ($config.tokens | default list) -}}
{{- $consumers := $job.consumers | default dict -}}
{{- if and $apiOn (kindIs "map" $consumers) (or $consumers.service_accounts $consumers.namespaces) -}}
{{- $tokenReview = true -}}
{{- end -}}
{{- $watched := false -}}
{{- range $sink := ($job.sinks | default list) -}}
{{- if eq (toString $sink.type) "kubernetes" -}}
{{- $entry := get $namespaces $sink.namespace | default (dict "secrets" (list) "watchSecrets" (list) "createSecrets" false "leases" (list) "createLeases" false) -}}
{{- $_ := set $entry "secrets" (append $entry.secrets $sink.name | uniq) -}}
{{- if and $watching (not $watched) -}}
{{- $_ := set $entry "watchSecrets" (append $entry.watchSecrets $sink.name | uniq) -}}
{{- $watched = true -}}
{{- end -}}
{{- if $sink.create -}}
{{- $_ := set $entry "createSecrets" true -}}
{{- end -}}
{{- $_ := set $namespaces $sink.namespace $entry -}}
{{- $precreate = append $precreate (dict "name" $sink.name "namespace" $sink.namespace "type" (default "Opaque" $sink.secret_type)) -}}
{{- end -}}
{{- end -}}
{{- end -}}
{{- $plan := dict "namespaces" $namespaces "precreate" $precreate "tokenReview" $tokenReview -}}
{{- $election := $config.leader_election | default dict -}}
{{- if $election.enabled -}}
{{- $entry := get $namespaces $election.namespace | default (dict "secrets" (list) "watchSecrets" (list) "createSecrets" false "leases" (list) "createLeases" false) -}}
{{- $_ := set $entry "leases" (append $entry.leases $election.name | uniq) -}}
{{- if not $.Values.leaderElection.createLease -}}
{{- $_ := set $entry "createLeases" true -}}
{{- end -}}
{{- $_ := set $namespaces $election.namespace $entry -}}
{{- $_ := set $plan "lease" (dict "name" $election.name "namespace" $election.namespace) -}}
{{- end -}}
{{- toYaml $plan -}}
{{- end -}}

{{/* ------------------------------------------------------------------ where the probes go

A YAML map `{probes: [{where, port}]}`: every token job's probe whose URL leaves the pod (not
localhost, 127.x or [::1]), with `where` its path in the config and `port` the URL's TCP port
(443 or 80 unless it names one; "" when a `${NAME}` hides it). The NetworkPolicy needs them:
a probe the policy blocks only ever errs, which never refreshes, and self-healing would be
off without a word.
*/}}
{{- define "refresher.probeTargets" -}}
{{- $config := include "refresher.configData" . | fromYaml -}}
{{- $probes := list -}}
{{- range $index, $job := ($config.tokens | default list) -}}
{{- if and (kindIs "map" $job) (kindIs "map" (get $job "probe")) -}}
{{- $url := toString (get $job.probe "url") -}}
{{- $scheme := lower (regexFind "^[A-Za-z][A-Za-z0-9+.-]*://" $url | trimSuffix "://") -}}
{{- $authority := regexReplaceAll "^[A-Za-z][A-Za-z0-9+.-]*://([^/?#]*).*$" $url "${1}" -}}
{{- $authority = regexReplaceAll "^.*@" $authority "" | lower -}}
{{- $host := regexReplaceAll `^(\[[^\]]*\]|[^:]*).*$` $authority "${1}" -}}
{{- $port := regexFind ":[0-9]+$" (trimPrefix $host $authority) | trimPrefix ":" -}}
{{- if and (not $port) (not (contains "${" $authority)) -}}
{{- $port = ternary "80" "443" (eq $scheme "http") -}}
{{- end -}}
{{- if not (or (eq $host "localhost") (eq $host "[::1]") (regexMatch `^127\.[0-9]+\.[0-9]+\.[0-9]+$` $host)) -}}
{{- $probes = append $probes (dict "where" (printf "config.tokens[%d].probe" $index) "port" $port) -}}
{{- end -}}
{{- end -}}
{{- end -}}
{{- toYaml (dict "probes" $probes) -}}
{{- end -}}

{{/* Whether the pod talks to the API server at all (Secrets, the Lease, TokenReviews): "true" or "". */}}
{{- define "refresher.usesKubernetes" -}}
{{- $plan := include "refresher.kubePlan" . | fromYaml -}}
{{- if or $plan.namespaces $plan.tokenReview -}}true{{- end -}}
{{- end -}}

{{/* ------------------------------------------------------------------ the pod */}}

{{- define "refresher.podTemplate" -}}
{{- $usesKube := include "refresher.usesKubernetes" . -}}
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
